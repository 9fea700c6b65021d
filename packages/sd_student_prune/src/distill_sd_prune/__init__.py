"""Smaller Stable Diffusion students distilled from SD 1.5 on COCO: recipes V1, V2.1, V2.2, V3 and block
pruning."""

__version__ = "0.1.0"
