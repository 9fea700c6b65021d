"""The denoiser network."""

from distill_rf_cifar.models.unet import ClassConditionalUNet, build_unet, count_parameters

__all__ = ["ClassConditionalUNet", "build_unet", "count_parameters"]
