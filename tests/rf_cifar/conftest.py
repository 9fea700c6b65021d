"""Tiny rf_cifar fixtures: a ~20k-parameter UNet, a few real CIFAR-10 images, a briefly trained teacher and its pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rf_helpers import pairs_config, tiny_loop, tiny_unet_config


@pytest.fixture(scope="session")
def cifar_images(data_root):
    """64 real CIFAR-10 training images as in-memory training data."""
    from distill_rf_cifar.training.data import load_cifar_training_data

    return load_cifar_training_data(data_root, "shards", limit=64, random_flip=True, show_progress=False)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, cifar_images) -> Path:
    """A tiny teacher trained for 4 steps and exported as a generator folder (2 Euler steps by default)."""
    from distill_rf_cifar.generator import save_generator
    from distill_rf_cifar.losses import RectifiedFlowLoss
    from distill_rf_cifar.models import build_unet
    from distill_rf_cifar.training import train

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = build_unet(tiny_unet_config())
    _, model, ema = train(tiny_loop(), model, RectifiedFlowLoss(), cifar_images, root / "run", progress=False)
    ema.copy_to(model)
    return save_generator(root / "generator", model, role="teacher", default_steps=2, default_guidance=1.0)


@pytest.fixture(scope="session")
def other_teacher_dir(tmp_path_factory) -> Path:
    """Same architecture, different (untrained) weights."""
    from distill_rf_cifar.generator import save_generator
    from distill_rf_cifar.models import build_unet

    torch.manual_seed(123)
    return save_generator(tmp_path_factory.mktemp("other") / "generator", build_unet(tiny_unet_config()),
                          role="teacher", default_steps=2)


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory, teacher_dir) -> Path:
    from distill_rf_cifar.pairs import make_pairs

    out = tmp_path_factory.mktemp("pairs") / "pairs"
    make_pairs(pairs_config(teacher_dir, out), progress=False)
    return out
