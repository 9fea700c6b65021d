"""The rf sweep's registry tags carry the FID interval (never a non-finite value); the pipeline table shows it in
80 columns, with the verdict the intervals establish."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from distill_eval.reports import compact_fid, mark_separability, verdict
from distill_rf_cifar.evaluation import registry_tags


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


def _demo_rows() -> list[dict]:
    """The README's demo numbers (FID [low, high], ms per image): teacher at 1, 2, 4, 16 steps, w = 2; students."""
    def row(model, role, steps, nfe, fid, low, high, ms):
        return {"model": model, "role": role, "sampler": "euler", "steps": steps, "nfe": float(nfe), "guidance": 2.0,
                "fid": fid, "fid_ci95_low": low, "fid_ci95_high": high, "ms_per_image": ms}

    rows = [row("teacher", "teacher", 1, 2, 351.8, 347.8, 355.8, 6.9), row("teacher", "teacher", 2, 4, 197.6, 190.0, 205.2, 12.7),
            row("teacher", "teacher", 4, 8, 111.4, 107.6, 115.3, 27.1),
            row("teacher", "teacher", 16, 32, 98.1, 94.3, 101.9, 102.5),
            row("four_step", "student", 4, 4, 101.2, 97.4, 105.0, 13.9),
            row("one_step", "student", 1, 1, 177.4, 171.6, 183.1, 3.3)]
    for r in rows:
        r["speedup_vs_teacher"] = 102.5 / r["ms_per_image"]
    mark_separability(rows)
    return rows


def test_verdict_and_compact_cells_say_what_the_intervals_establish() -> None:
    rows = _demo_rows()
    by = {(r["model"], r["steps"]): r for r in rows}
    assert compact_fid(by["four_step", 4]) == "101.2 ±3.8" and compact_fid({"fid": 30.0}) == "30.0"
    assert verdict(by["four_step", 4], rows) == "\u22129.2% vs teacher@4, disjoint"  # rounded inputs (the run: −9.1%)
    assert verdict(by["one_step", 1], rows) == "\u221249.6% vs teacher@1, disjoint"
    assert verdict(by["teacher", 16], rows) == "best" and verdict(by["teacher", 4], rows) == ""
    close = {**by["four_step", 4], "fid": 110.0, "fid_ci95_low": 106.0, "fid_ci95_high": 114.0}
    assert verdict(close, rows) == "\u22121.3% vs teacher@4, overlap"  # not established
    no_same_steps = {**by["four_step", 4], "steps": 3, "nfe": 4.0}
    assert verdict(no_same_steps, rows).endswith("vs teacher@2 (=NFE), disjoint")


def test_the_demo_table_fits_80_columns_without_wrapping() -> None:
    from rich.console import Console

    from distill_rf_cifar.config import PIPELINE_PRESETS
    from distill_rf_cifar.pipeline import PipelineResult, summary_table

    result = PipelineResult(Path("runs/rf_cifar/smoke"), True, 532.0, rows=_demo_rows(),
                            protocol={"generated_n": 360, "reference_n": 1000, "reference_set": "cifar10-train"},
                            versions={"teacher": ("rf_cifar-teacher", "1"), "four_step": ("rf_cifar-student", "12"),
                                      "one_step": ("rf_cifar-student", "13")},
                            champion_versions={"rf_cifar-student": "12", "rf_cifar-teacher": "1"})
    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    console.print(summary_table(result, PIPELINE_PRESETS["smoke"]()))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    body = [line for line in lines if line.strip() and not set(line.strip()) <= set("━─ ")]
    assert len(body) == 2 + len(result.rows), "\n".join(lines)  # title, header, one line per row: nothing wraps
    four = next(line for line in body if line.lstrip().startswith("four_step"))
    assert "v12 ★" in four and "101.2 ±3.8" in four and "\u22129.2% vs teacher@4, disjoint" in four
