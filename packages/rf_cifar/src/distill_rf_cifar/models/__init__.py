"""The denoiser network."""

from distill_rf_cifar.models.unet import (
    ClassConditionalUNet,
    build_unet,
    count_parameters,
    with_guidance_embedding,
)

__all__ = ["ClassConditionalUNet", "build_unet", "count_parameters", "with_guidance_embedding"]
