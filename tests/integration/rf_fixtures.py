"""Tiny rf_cifar generator folders (random weights) for the integration tests that serve or show models."""

from __future__ import annotations

from pathlib import Path


def tiny_rf_generator(folder: Path, role: str, default_steps: int, seed: int) -> Path:
    """An rf_cifar generator folder: the package's UNet at a tiny width (random weights), saved by rf_cifar."""
    import torch

    from distill_rf_cifar.config import UNetConfig
    from distill_rf_cifar.generator import save_generator
    from distill_rf_cifar.models.unet import build_unet

    torch.manual_seed(seed)
    unet = build_unet(UNetConfig(base_channels=8, channel_mults=[1, 2], res_blocks=1, attention_resolutions=[],
                                 mid_attention=False, dropout=0.0, norm_groups=8))
    return save_generator(folder, unet, role=role, default_steps=default_steps)
