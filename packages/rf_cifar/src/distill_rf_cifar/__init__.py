"""CIFAR-10 rectified-flow teacher, noise-to-image pairs, and one-step / four-step students."""

__version__ = "0.1.0"
