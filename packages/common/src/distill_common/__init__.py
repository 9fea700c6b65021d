"""Shared configs, runtime, data, model loading and MLflow tracking for the diffusion-distillation workbench."""

__version__ = "0.1.0"
