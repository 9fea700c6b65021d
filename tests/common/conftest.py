"""Fixtures for distill_common tests: a deterministic stand-in generator family registered for one test."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill_common import generator as generator_mod
from distill_common import tracking


class NoiseGenerator:
    """A deterministic stand-in generator: image = sigmoid of seeded noise, shifted by the class."""

    family = "test_noise"
    condition_kind = "class"
    resolution = 8
    default_steps = 2

    def __init__(self, folder: Path, device: str = "auto"):
        self.scale = json.loads((folder / "generator.json").read_text())["scale"]

    def generate(self, conditions, num_steps, seeds, guidance=None):
        out = []
        for c, s in zip(conditions, seeds):
            g = torch.Generator().manual_seed(int(s))
            out.append(torch.sigmoid(self.scale * torch.randn(3, 8, 8, generator=g) + int(c) / 10))
        return torch.stack(out)


@pytest.fixture
def noise_family(monkeypatch):
    monkeypatch.setattr(generator_mod, "generator_loaders",
                        lambda: {"test_noise": SimpleNamespace(load=lambda: NoiseGenerator)})


@pytest.fixture
def logged_generator(tmp_path: Path, noise_family):
    """Returns ``make(scale) -> model URI``: a NoiseGenerator folder logged as a pyfunc model."""

    def make(scale: float) -> str:
        return _log(tmp_path, scale)

    return make


def _log(tmp_path: Path, scale: float) -> str:
    folder = tmp_path / f"gen-{scale}"
    generator_mod.write_generator_manifest(folder, "test_noise", scale=scale)
    with tracking.start_run("unit", f"gen-{scale}") as run:
        return tracking.log_generator_model(run, folder)


