"""Parameter counts and multiply-accumulates (MACs) per UNet call.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on a *meta-device* copy built
from the UNet's config, so counting costs no memory or compute and does not depend on the device: on the meta
device ``scaled_dot_product_attention`` decomposes into batched matmuls, which the counter sees (on a real CPU
the fused attention kernel is invisible to it). Three parts are reported: convolutions, linear layers
(``mm``/``addmm``) and the attention matmuls (``bmm``: QK^T and AV). BK-SDM's published MACs (339G for the SD
1.4 UNet at 64x64 latents, 224G Base, 205G Tiny) count convolutions and linear layers only; our ``conv +
linear`` reproduces them (338.6G, 223.7G, 205.0G), and ``total`` adds the attention matmuls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from distill_sd_prune.architecture.pruning import layer_modules, plain_config


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def layer_parameters(unet: nn.Module) -> dict[str, int]:
    """Parameters per layer-granularity module (``down_blocks.0.resnets.0`` …), see
    ``pruning.layer_modules``."""
    modules = dict(unet.named_modules())
    return {name: count_parameters(modules[name]) for name in layer_modules(unet)}


@dataclass(frozen=True)
class MacsReport:
    """MACs of one UNet call on a batch of ``batch`` latents of side ``latent_size``."""

    total: int
    conv: int
    linear: int
    attention: int
    latent_size: int
    batch: int

    @property
    def conv_linear(self) -> int:
        return self.conv + self.linear

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "conv_linear": self.conv_linear}


_CONV = ("convolution",)
_LINEAR = ("mm", "addmm")
_ATTENTION = (
    "bmm",
    "baddbmm",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
)


def unet_macs(
    config: Mapping[str, Any], latent_size: int, batch: int = 1, text_length: int = 77
) -> MacsReport:
    """MACs of ``UNet2DConditionModel(**config)`` for one call (see the module docstring)."""
    key = json.dumps(plain_config(config), sort_keys=True, default=list)
    return _unet_macs(key, int(latent_size), int(batch), int(text_length))


@functools.lru_cache(maxsize=64)
def _unet_macs(config_json: str, latent_size: int, batch: int, text_length: int) -> MacsReport:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    cross = config.get("cross_attention_dim", 768)
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        sample = torch.empty(batch, int(config.get("in_channels", 4)), latent_size, latent_size)
        text = torch.empty(batch, text_length, int(cross))
        timestep = torch.full((batch,), 10, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, timestep, text)
    parts = {"conv": 0, "linear": 0, "attention": 0}
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[1] if "." in str(op) else str(op)
        part = (
            "conv"
            if name in _CONV
            else "linear"
            if name in _LINEAR
            else "attention"
            if name in _ATTENTION
            else None
        )
        if part is not None:
            parts[part] += int(flops) // 2
    total = int(counter.get_total_flops()) // 2
    return MacsReport(total=total, latent_size=latent_size, batch=batch, **parts)


def complexity_row(label: str, unet: nn.Module, latent_size: int) -> dict[str, Any]:
    """One table row: parameters and MACs (G) of ``unet`` at ``latent_size``."""
    macs = unet_macs(unet.config, latent_size)
    return {
        "model": label,
        "params": count_parameters(unet),
        "gmacs": macs.total / 1e9,
        "gmacs_conv_linear": macs.conv_linear / 1e9,
        "gmacs_attention": macs.attention / 1e9,
        "latent_size": latent_size,
    }
