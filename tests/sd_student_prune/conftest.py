"""Fixtures of the sd_student_prune tests: the tiny SD 1.5-shaped teacher (``tiny_sd_path`` from
tests/conftest.py) loaded once, and fixed UNet inputs (latent 16 -> 64x64 images)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Tiny models run fastest on one thread on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_unet(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_sd_path / "unet")).eval()


@pytest.fixture(scope="session")
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)  # (B, 4, h, w)
    text = torch.randn(2, 77, 32, generator=g)  # (B, 77, D)
    return sample, torch.tensor([10, 700]), text


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample
