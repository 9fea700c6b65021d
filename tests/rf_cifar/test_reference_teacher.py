"""The reference teacher shipped with distill-rf-cifar: its card matches its weights, ``reference`` loads and
samples everywhere a teacher is accepted, and it registers in MLflow like a trained generator."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from rf_helpers import load_tool

from distill_common.errors import ModelLoadError
from distill_common.generator import load_generator, named_generators, resolve_generator_folder
from distill_rf_cifar.generator import MODEL_FILE, REFERENCE_TEACHER, load_model, weights_sha256
from distill_rf_cifar.generator import named_generators as rf_cifar_generators


@pytest.mark.parametrize("name", sorted(rf_cifar_generators()))
def test_model_card_states_the_sha256_of_the_shipped_weights_and_the_protocol(name):
    folder = rf_cifar_generators()[name]
    card = (folder / "MODEL_CARD.md").read_text()
    digest = hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()
    assert re.search(r"sha256: `([0-9a-f]{64})`", card).group(1) == digest
    assert (folder / MODEL_FILE).stat().st_size <= 15e6
    training = json.loads((folder / "training.json").read_text())
    for needle in (training["command"], training["commit"], "FID", "interval", "generated", "cifar10-train"):
        assert needle in card, needle
    assert weights_sha256(name) == digest  # the name loads these very weights


def test_reference_resolves_by_name_and_samples_cifar_shaped_images():
    assert named_generators()["reference"] == REFERENCE_TEACHER
    assert set(rf_cifar_generators()) <= {"reference", "reference-v1"}
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


def test_a_warm_start_continues_the_shipped_history_and_reships_only_on_a_measured_gain():
    """export keeps the earlier stages and the FID curve and adds the images seen; the card's gate passes only when
    the new interval lies below the previous one on the same protocol."""
    tool = load_tool("reference_teacher")
    protocol = {"extractor_hash": "9d7e5a4f85a9", "reference_set": "cifar10-train", "reference_n": 10000,
                "generated_n": 10000, "resolution": 32, "resize": "none", "feature_precision": "bf16"}
    first_point = {"images_seen": 288_000, "setting": "heun:8:2", "fid": 30.50, "fid_low": 30.10, "fid_high": 30.91,
                   "sha256": "a" * 64, "protocol": protocol}
    shipped = {"command": "distill rf train-teacher ...", "commit": "f93dc61", "steps": 4500, "wall_time_s": 5100.0,
               "hardware": "AMD EPYC", "precision": "bf16 autocast", "run_id": "first", "batch_size": 64,
               "data": "CIFAR-10 train", "parameters": 1541891, "sha256": "a" * 64, "fid_curve": [first_point]}
    new_stage = {"command": "distill rf train-teacher --init reference ...", "commit": "abc1234", "steps": 9000,
                 "wall_time_s": 5400.0, "hardware": "AMD EPYC, 2 thread(s), no GPU", "precision": "bf16 autocast",
                 "run_id": "r", "batch_size": 64, "data": shipped["data"], "parameters": shipped["parameters"]}
    record = tool._with_history(new_stage, shipped, {"init": "reference", "init_sha256": shipped["sha256"]})
    assert [st["steps"] for st in record["stages"]] == [4500, 9000]
    assert record["images_seen"] == 4500 * 64 + 9000 * 64 and record["fid_curve"] == shipped["fid_curve"]
    with pytest.raises(SystemExit, match="other weights"):
        tool._with_history(new_stage, shipped, {"init": "x", "init_sha256": "0" * 64})
    shipped_again = {**record, "sha256": "e" * 64}  # exported and carded once already: exporting it again
    again = tool._with_history(new_stage, shipped_again, {"init": "reference", "init_sha256": shipped["sha256"]})
    assert [st["steps"] for st in again["stages"]] == [4500, 9000] and again["images_seen"] == record["images_seen"]

    def best(fid, low, high, protocol=first_point["protocol"]):
        return {"sampler": "heun", "steps": 8, "guidance": 2.0, "fid": fid, "fid_low": low, "fid_high": high,
                "protocol": protocol}

    better, curve, improved = tool._curve_with(record, best(24.0, 23.6, 24.4), "f" * 64)
    assert improved is True and [c["images_seen"] for c in curve] == [288_000, 864_000]
    assert better["sha256"] == "f" * 64 and better["fid_curve"][-1]["fid"] == 24.0
    _, _, improved = tool._curve_with(record, best(30.3, 29.9, 30.7), "f" * 64)  # overlaps 30.50 [30.10, 30.91]
    assert improved is False
    other = {**first_point["protocol"], "generated_n": 2000}
    _, curve, improved = tool._curve_with(record, best(20.0, 19.0, 21.0, other), "f" * 64)
    assert improved is None and len(curve) == 2  # another protocol: no verdict
    _, again, _ = tool._curve_with(better, best(23.9, 23.5, 24.3), "f" * 64)
    assert len(again) == 2 and again[-1]["fid"] == 23.9  # the same weights rescored replace their point
    # --require-improvement: only a gain beyond the previous interval on the same protocol ships
    folder = Path("pkg/reference_teacher")
    gain = tool._curve_with(record, best(24.0, 23.6, 24.4), "f" * 64)
    assert gain[2] is True and tool._refusal(gain[1], gain[2], folder) is None
    worse = tool._curve_with(record, best(30.3, 29.9, 30.7), "f" * 64)[1]
    assert "does not improve beyond the interval of the shipped 30.50" in tool._refusal(worse, False, folder)
    other_curve = tool._curve_with(record, best(20.0, 19.0, 21.0, other), "f" * 64)[1]
    msg = tool._refusal(other_curve, None, folder)
    assert "another protocol (differing: generated_n)" in msg and "git checkout" in msg and "\n" not in msg
    first = tool._curve_with({**new_stage, "fid_curve": []}, best(24.0, 23.6, 24.4), "f" * 64)
    assert first[2] is None and "no earlier point" in tool._refusal(first[1], None, folder)
    assert "no earlier point" in tool._refusal([], None, folder)  # card refuses this before scoring anything
    for refusal in (tool._refusal(worse, False, folder), tool._refusal(first[1], None, folder)):
        assert refusal.startswith("error: ") and "\n" not in refusal and "git checkout" in refusal
