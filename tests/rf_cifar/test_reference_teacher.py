"""The reference teacher shipped with distill-rf-cifar: its card matches its weights, ``reference`` loads and
samples everywhere a teacher is accepted, and it registers in MLflow like a trained generator."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from distill_common.errors import ModelLoadError
from distill_common.generator import load_generator, named_generators, resolve_generator_folder
from distill_rf_cifar.generator import MODEL_FILE, REFERENCE_TEACHER, load_model, weights_sha256


def test_model_card_states_the_sha256_of_the_shipped_weights_and_the_protocol():
    card = (REFERENCE_TEACHER / "MODEL_CARD.md").read_text()
    digest = hashlib.sha256((REFERENCE_TEACHER / MODEL_FILE).read_bytes()).hexdigest()
    assert re.search(r"sha256: `([0-9a-f]{64})`", card).group(1) == digest
    assert (REFERENCE_TEACHER / MODEL_FILE).stat().st_size <= 15e6
    training = json.loads((REFERENCE_TEACHER / "training.json").read_text())
    for needle in (training["command"], training["commit"], "FID", "interval", "generated", "cifar10-train"):
        assert needle in card, needle


def test_reference_resolves_by_name_and_samples_cifar_shaped_images():
    assert named_generators()["reference"] == REFERENCE_TEACHER
    assert resolve_generator_folder("rf_cifar:reference") == REFERENCE_TEACHER
    gen = load_generator("reference", device="cpu")
    manifest = json.loads((REFERENCE_TEACHER / "generator.json").read_text())
    assert gen.default_steps == manifest["default_steps"] and gen.default_guidance == manifest["default_guidance"]
    images = gen.generate([0, 7], 2, [0, 1])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.std()) > 0.05
    assert torch.equal(gen.generate([0, 7], 2, [0, 1]), images)  # same seeds, same images
    model = load_model("reference")  # fp16 storage loads as fp32 weights
    assert next(model.parameters()).dtype == torch.float32
    assert weights_sha256("reference") == weights_sha256(REFERENCE_TEACHER)


def test_an_unknown_name_lists_the_shipped_generators():
    with pytest.raises(ModelLoadError, match="reference"):
        resolve_generator_folder("no-such-teacher")


def test_reference_registers_in_mlflow_like_a_trained_generator(tmp_path, mlflow_uri):
    from distill_common import tracking
    from distill_rf_cifar.stages import use_teacher

    outcome = use_teacher("reference", tmp_path / "teacher", experiment="reference-test")
    assert outcome.finished and outcome.model_uri and outcome.generator_dir == REFERENCE_TEACHER
    version = tracking.register_model(outcome.model_uri, "rf_cifar-teacher",
                                      tags={"generator.sha256": weights_sha256(REFERENCE_TEACHER)})
    loaded = load_generator(f"models:/rf_cifar-teacher/{version}", device="cpu")
    assert torch.equal(loaded.generate([3], 2, [5]), load_generator("reference", device="cpu").generate([3], 2, [5]))
    again = use_teacher("reference", tmp_path / "teacher", experiment="reference-test")
    assert again.skipped and again.model_uri == outcome.model_uri  # a rerun reuses the logged model
