"""Flash-LoRA few-step generation and LoRA student distillation from Stable Diffusion 1.5."""

__version__ = "0.1.0"
