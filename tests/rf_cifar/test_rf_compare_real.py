"""``distill rf compare --preset real`` (issue 23): the same training wall clock for every method (calibrated steps,
never fewer than --train-steps), DMD2 among the methods, class accuracy next to FID in the table."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distill_rf_cifar.compare import compare_methods, run_compare
from distill_rf_cifar.config import COMPARE_PRESETS, DataConfig


def test_the_real_preset_is_the_issues_protocol():
    cfg = COMPARE_PRESETS["real"]()
    assert cfg.budget == "wall_clock" and cfg.budget_seconds is None and cfg.train.steps >= 1000
    assert cfg.eval.num_images == 2000 and cfg.eval.reference_n == 10_000 and cfg.eval.bootstrap_resamples > 0
    assert cfg.eval.class_accuracy and cfg.eval.student_steps == [1, 2, 4]
    assert cfg.eval.feature_precision == "bf16+compile"  # tens of thousands of Inception images: it pays off
    assert cfg.methods == [] and {"dmd", "guided_progressive"} <= set(compare_methods())  # every method, DMD2 too


def test_wall_clock_budget_calibrates_steps_and_the_table_carries_class_accuracy(tmp_path, teacher_dir, data_root):
    from distill_eval.classifier import CifarClassifier

    torch.manual_seed(0)
    classifier = CifarClassifier(width=4).eval()  # the shipped weights land later; any 10-class network will do
    cfg = COMPARE_PRESETS["tiny"]()
    cfg = dataclasses.replace(cfg, teacher=str(teacher_dir), methods=["one_step", "dmd"], output_dir=tmp_path / "cmp",
                              budget="wall_clock", calibration_steps=1, track=False, lpips=False, device="cpu",
                              data=DataConfig(data_root=data_root, limit=32))
    cfg.train = dataclasses.replace(cfg.train, steps=2, device="cpu")
    cfg.eval = dataclasses.replace(cfg.eval, num_images=4, reference_n=8, student_steps=[1], teacher_steps=[1],
                                   bootstrap_resamples=0)
    result = run_compare(cfg, progress=False, classifier=classifier)
    calibration = json.loads((tmp_path / "cmp" / "calibration.json").read_text())
    per_step, steps = calibration["seconds_per_step"], calibration["steps"]
    assert set(per_step) == {"one_step", "dmd"} and per_step["dmd"] > per_step["one_step"] > 0
    assert steps["dmd"] == 2 and steps["one_step"] >= 2  # the slowest gets --train-steps, the others the same time
    assert calibration["budget_seconds"] == pytest.approx(2 * per_step["dmd"]) and calibration["over_budget"] == []
    by = {(r["method"], r["steps"]): r for r in result.rows}
    assert by[("dmd", 1)]["train_steps"] == 2 and by[("one_step", 1)]["train_steps"] == steps["one_step"]
    for r in result.rows:
        assert 0.0 <= r["class_acc_ci95_low"] <= r["class_acc"] <= r["class_acc_ci95_high"] <= 1.0
        assert r["class_accuracy"].endswith("]") and "%" in r["class_accuracy"]
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert "same training wall clock" in report["meta"]["budget"] and "dmd 2" in report["meta"]["budget"]
    assert "class_accuracy" in (tmp_path / "cmp" / "compare.md").read_text()
