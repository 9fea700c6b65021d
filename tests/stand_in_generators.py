"""A deterministic stand-in generator family for tests of the shared layers (tracking, registry, eval)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class NoiseGenerator:
    """A deterministic stand-in generator: image = sigmoid of seeded noise, shifted by the class."""

    family = "test_noise"
    condition_kind = "class"
    resolution = 32
    default_steps = 2
    images_generated = 0  # across instances: lets resume tests count regenerated images

    def __init__(self, folder: Path, device: str = "auto"):
        self.scale = json.loads((folder / "generator.json").read_text())["scale"]

    def generate(self, conditions, num_steps, seeds, guidance=None):
        out = []
        NoiseGenerator.images_generated += len(conditions)
        for c, s in zip(conditions, seeds, strict=True):
            g = torch.Generator().manual_seed(int(s))
            out.append(torch.sigmoid(self.scale * torch.randn(3, 32, 32, generator=g) + int(c) / 10))
        return torch.stack(out)
