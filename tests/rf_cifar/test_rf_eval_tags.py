"""The rf sweep's registry tags carry the FID interval (never a non-finite value), and the pipeline table shows it."""

from __future__ import annotations

import json
import math

from distill_rf_cifar.evaluation import registry_tags
from distill_rf_cifar.pipeline import _fid_cell


def test_registry_tags_carry_the_interval_and_skip_non_finite_values() -> None:
    rows = [
        {"model": "four_step", "sampler": "euler", "steps": 4, "nfe": 4, "fid": 21.5, "fid_ci95_low": 20.1,
         "fid_ci95_high": 22.8, "kid": 0.01, "ms_per_image": 3.0},
        {"model": "four_step", "sampler": "euler", "steps": 1, "nfe": 1, "fid": 80.0, "fid_ci95_low": math.nan,
         "fid_ci95_high": math.inf, "kid": 0.05, "ms_per_image": 1.0},
        {"model": "teacher", "sampler": "euler", "steps": 4, "nfe": 4, "fid": 30.0, "kid": 0.02, "ms_per_image": 3.0},
    ]
    tags = registry_tags(rows, "four_step", {"reference_set": "cifar10-train", "feature_precision": "fp32"})
    assert tags["eval.s4.fid_ci95_low"] == 20.1 and tags["eval.s4.fid_ci95_high"] == 22.8
    assert "eval.s1.fid_ci95_low" not in tags and "eval.s1.fid_ci95_high" not in tags and tags["eval.s1.fid"] == 80.0
    assert json.loads(tags["eval.protocol"])["feature_precision"] == "fp32"
    assert not any(k.startswith("eval.s4.") and "teacher" in k for k in tags)


def test_pipeline_table_cell_shows_interval_and_markers() -> None:
    row = {"fid": 21.54, "fid_ci95_low": 20.1, "fid_ci95_high": 22.8, "fid_vs_best": "≈ best", "fid_vs_teacher": "better",
           "steps": 4, "nfe": 4.0, "fid_vs_teacher_nfe": "≈"}
    assert _fid_cell(row) == "21.5 [20.1, 22.8] ≈ best < teacher@4st ≈ teacher@4NFE"
    assert _fid_cell({"fid": 30.0}) == "30.0"
