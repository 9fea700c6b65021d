"""Shipping a student of the reference teacher as a named generator (tools/reference_students.py): export checks the
teacher, the shipped name loads and is sha-checked, and the card is written only from an evaluation of the shipped
weights on a large enough protocol."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from rf_helpers import load_tool, tiny_unet_config

from distill_common.errors import ModelLoadError
from distill_rf_cifar import generator as rf_generator
from distill_rf_cifar.generator import MODEL_FILE, load_generator, save_generator, weights_sha256


def _student(folder: Path, teacher: Path, seed: int = 1) -> Path:
    from distill_rf_cifar.models import build_unet

    torch.manual_seed(seed)
    return save_generator(folder, build_unet(tiny_unet_config()), role="progressive", default_steps=1,
                          recipe="progressive", teacher=str(teacher), teacher_sha256=weights_sha256(teacher),
                          train_steps=4)


def _export_args(run: Path, name: str = "reference-one-step", fp32: bool = False) -> argparse.Namespace:
    return argparse.Namespace(run_dir=str(run), name=name, command="distill rf distill --recipe progressive ...",
                              commit="abc1234", wall_time_s=None, hardware="test CPU, 2 threads", precision="fp32",
                              fp32=fp32)


def test_export_evaluate_card_and_the_refusals(tmp_path, teacher_dir, other_teacher_dir, data_root, monkeypatch):
    from distill_rf_cifar.config import EvalConfig
    from distill_rf_cifar.evaluation import run_sweep

    tool = load_tool("reference_students")
    root = tmp_path / "reference_students"
    monkeypatch.setattr(rf_generator, "REFERENCE_STUDENTS", root)
    run = tmp_path / "run"
    _student(run / "generator", teacher_dir)
    (run / "stage.json").write_text(json.dumps({"run_id": "r1", "info": {"train_seconds": 72.0}}))

    # export: bad names, another teacher and a teacher are refused before anything is written
    for bad in ("one-step", "reference", "reference-v1", "reference-v2", "reference-One"):
        with pytest.raises(SystemExit, match="--name"):
            tool.export(_export_args(run, bad), root, teacher_dir)
    with pytest.raises(SystemExit, match="not the shipped reference"):
        tool.export(_export_args(run), root, other_teacher_dir)
    with pytest.raises(SystemExit, match="is a teacher"):
        tool.export(_export_args(teacher_dir.parent), root, teacher_dir)
    assert not root.exists()

    shipped = tool.export(_export_args(run), root, teacher_dir)
    manifest = json.loads((shipped / "generator.json").read_text())
    assert manifest["name"] == "reference-one-step" and manifest["teacher"] == "reference"
    assert manifest["storage_dtype"] == "float16" and manifest["default_steps"] == 1
    training = json.loads((shipped / "training.json").read_text())
    assert training["wall_time_s"] == 72.0 and training["hardware"] == "test CPU, 2 threads"  # from the run, as given
    assert "reference-one-step" in rf_generator.named_generators()  # discovered under reference_students/
    impostor = root / "reference"
    impostor.mkdir()
    (impostor / "generator.json").write_text((shipped / "generator.json").read_text())
    assert rf_generator.named_generators()["reference"] == rf_generator.REFERENCE_TEACHER  # never a teacher's name
    impostor.joinpath("generator.json").unlink()
    impostor.rmdir()
    student = load_generator("reference-one-step", device="cpu", precision="fp32")  # by name, sha-checked
    assert student.generate([3], 1, [0]).shape == (1, 3, 32, 32)

    # evaluate the shipped folder on a tiny protocol
    cfg = EvalConfig(teacher_steps=[2], teacher_rk45=False, student_steps=[1], students_at_own_steps=True, num_images=8,
                     reference="cifar10-train", reference_n=8, batch_size=8, timing_batch=8, timing_repeats=1,
                     sample_precision="fp32", feature_precision="bf16", bootstrap_resamples=20)
    teacher = ("teacher", load_generator(teacher_dir, device="cpu"))
    out = tmp_path / "eval"
    run_sweep(teacher, [("one", student)], cfg, out, data_root=data_root, progress=False)
    side = json.loads((out / "images" / "one_s1" / "result.json").read_text())

    card_args = argparse.Namespace(name="reference-one-step", eval_dir=str(out), label="one", min_images=10000)
    refusals = [(card_args, teacher_dir, "fewer than --min-images 10000"),
                (argparse.Namespace(**{**vars(card_args), "label": "two", "min_images": 8}), teacher_dir,
                 "models: one, teacher"),
                (argparse.Namespace(**{**vars(card_args), "min_images": 8}), other_teacher_dir,
                 "not made by the shipped reference teacher")]  # the card's teacher rows must be the shipped teacher's
    for args, teacher_folder, needle in refusals:
        with pytest.raises(SystemExit, match=needle) as refused:
            tool.card(args, root, teacher_folder)
        assert "\n" not in str(refused.value) and not (shipped / "MODEL_CARD.md").read_text().count("## Evaluation")
    card_args.min_images = 8
    tool.card(card_args, root, teacher_dir)
    card = (shipped / "MODEL_CARD.md").read_text()
    digest = hashlib.sha256((shipped / MODEL_FILE).read_bytes()).hexdigest()
    assert re.search(r"sha256: `([0-9a-f]{64})`", card).group(1) == digest
    assert f"{side['fid']:.2f} [{side['fid_ci95_low']:.2f}, {side['fid_ci95_high']:.2f}]" in card
    assert f"{100 * side['class_acc']:.1f}%" in card and "| teacher | euler | 2 |" in card
    for needle in ("distill rf distill --recipe progressive ...", "abc1234", "cifar10-train", "8 generated images"):
        assert needle in card, needle

    # re-exported weights (fp32 storage: other bytes) no longer match the evaluation: the card is refused
    tool.export(_export_args(run, fp32=True), root, teacher_dir)
    with pytest.raises(SystemExit, match="were not made by the shipped reference-one-step"):
        tool.card(card_args, root, teacher_dir)
    # an altered shipped file fails the loader's sha check in one line
    (shipped / MODEL_FILE).write_bytes((shipped / MODEL_FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="do not match the sha256"):
        load_generator("reference-one-step", device="cpu")
