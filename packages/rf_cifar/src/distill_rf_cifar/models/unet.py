"""A compact class-conditional UNet for 32x32 images: diffusers' ``UNet2DModel`` (the DDPM layout of Ho et al.
2020: residual blocks, optional self-attention per resolution, sinusoidal time embedding) with a learned class
embedding added to the time embedding. Label ``num_classes`` is the null class that classifier-free guidance
(Ho & Salimans 2022) trains by label dropout.

Sizes (fp32 weights): the default (64 channels, multipliers 1-1-2, one block per level, attention at 16 px)
has 3,085,827 parameters = 12.3 MB, the size of the seed project's teacher; the smoke preset 264,307 (1.1 MB);
the cpu preset 1,065,059 (4.3 MB); the paper preset is DDPM's CIFAR-10 network, 35,751,939 (143 MB).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from distill_rf_cifar.config import UNetConfig

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as the DDPM timestep t * 1000


class ClassConditionalUNet(nn.Module):
    """``forward(x (B, 3, 32, 32), t (B,) in [0, 1], y (B,) in 0..num_classes) -> (B, 3, 32, 32)`` velocity."""

    def __init__(self, cfg: UNetConfig, resolution: int = 32) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        cfg.validate()
        self.config = dataclasses.replace(cfg)
        self.resolution = resolution
        self.num_classes = cfg.num_classes
        self.null_class = cfg.num_classes  # the extra embedding row used for the unconditional branch
        down, up = [], []
        size = resolution
        for _ in cfg.channel_mults:
            attn = size in cfg.attention_resolutions
            down.append("AttnDownBlock2D" if attn else "DownBlock2D")
            up.append("AttnUpBlock2D" if attn else "UpBlock2D")
            size //= 2
        self.net = UNet2DModel(
            sample_size=resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mults),
            layers_per_block=cfg.res_blocks,
            down_block_types=tuple(down),
            up_block_types=tuple(reversed(up)),
            add_attention=cfg.mid_attention,
            attention_head_dim=None,  # one head per attention layer, as DDPM
            dropout=cfg.dropout,
            norm_num_groups=cfg.norm_groups,
            num_class_embeds=cfg.num_classes + 1,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4 and x.shape[1] == 3, f"expected (B, 3, H, W) images, got {tuple(x.shape)}"
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if self.num_classes == 0:  # unconditional: every label is the null class
            y = torch.zeros_like(y)
        return self.net(x, t.to(x.dtype) * TIME_SCALE, class_labels=y).sample  # (B, 3, H, W)


def build_unet(cfg: UNetConfig) -> ClassConditionalUNet:
    return ClassConditionalUNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
