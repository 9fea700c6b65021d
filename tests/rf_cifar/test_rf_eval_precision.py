"""The generation precision of an evaluation folder: recorded before the first image, and a sweep in another
precision refuses to mix its images with the folder's."""

from __future__ import annotations

import json

import pytest

from distill_common.errors import ConfigError, DistillError
from distill_rf_cifar.config import EvalConfig
from distill_rf_cifar.evaluation import run_sweep
from distill_rf_cifar.generator import load_generator


def _cfg(precision: str) -> EvalConfig:
    return EvalConfig(teacher_steps=[1], teacher_rk45=False, student_steps=[], num_images=4, batch_size=4,
                      sample_precision=precision, reference="no-such-reference", bootstrap_resamples=0)


def test_folder_records_its_precision_and_refuses_another(tmp_path, teacher_dir, monkeypatch):
    from distill_common import runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    teacher = ("teacher", load_generator(teacher_dir, device="cpu"))
    out = tmp_path / "eval"
    with pytest.raises(DistillError):  # images are made, then the unknown reference set stops the sweep
        run_sweep(teacher, [], _cfg("fp32"), out, progress=False)
    steps = teacher[1].default_steps
    folders = sorted((out / "images").iterdir())
    assert folders and all(len(list(f.glob("*.png"))) == 4 for f in folders)
    assert {json.loads((f / "result.json").read_text())["sample_precision"] for f in folders} == {"fp32"}
    with pytest.raises(ConfigError, match=r"generated in fp32, this sweep generates in bf16"):
        run_sweep(teacher, [], _cfg("auto"), out, progress=False)  # auto -> bf16 on this (patched) CPU
    assert (out / "images" / f"teacher_s{steps}").is_dir()
