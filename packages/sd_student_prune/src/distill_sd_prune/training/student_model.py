"""The trainable module: the student UNet plus the ConvProjection adapters of feature KD, in one ``nn.Module``
so that DDP / Accelerate wrap (and synchronise gradients of) both, and the projections run inside ``forward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distill_sd_prune.architecture.projection import ConvProjection
from distill_sd_prune.losses.feature_hooks import FeatureRecorder, resolve_module


def module_out_channels(module: nn.Module) -> int:
    """Channels of a UNet block's / layer's main output."""
    if hasattr(module, "resnets") and len(module.resnets):
        return int(module.resnets[-1].out_channels)
    for attr in ("out_channels", "channels"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    raise ValueError(f"cannot tell the output channels of {type(module).__name__}")


def projection_key(block: str) -> str:
    return block.replace(".", "__")


class DistillStudent(nn.Module):
    """``forward(sample, timestep, encoder_hidden_states) -> (prediction, {student block: projected
    feature})``."""

    def __init__(
        self,
        unet: nn.Module,
        feature_pairs: Mapping[str, str] | None = None,
        teacher: nn.Module | None = None,
        init: str = "slice",
    ) -> None:
        super().__init__()
        self.unet = unet
        self.feature_pairs = dict(feature_pairs or {})
        self.projections = nn.ModuleDict()
        for s_name, t_name in self.feature_pairs.items():
            if teacher is None:
                raise ValueError("feature KD needs the teacher to size the projections")
            c_s = module_out_channels(resolve_module(unet, s_name))
            c_t = module_out_channels(resolve_module(teacher, t_name))
            if c_s != c_t:
                self.projections[projection_key(s_name)] = ConvProjection(c_s, c_t, init)
        self.recorder = FeatureRecorder(unet, list(self.feature_pairs)) if self.feature_pairs else None

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.recorder is not None:
            self.recorder.clear()
        prediction = self.unet(sample, timestep, encoder_hidden_states).sample  # (B, 4, h, w)
        features: dict[str, torch.Tensor] = {}
        if self.recorder is not None:
            for name, feature in self.recorder.features.items():
                key = projection_key(name)
                features[name] = self.projections[key](feature) if key in self.projections else feature
        return prediction, features

    def extra_repr(self) -> str:
        return f"feature_pairs={len(self.feature_pairs)}, projections={len(self.projections)}"


def describe_pairs(pairs: Mapping[str, str]) -> dict[str, Any]:
    return {f"feature_pair.{s}": t for s, t in pairs.items()}
