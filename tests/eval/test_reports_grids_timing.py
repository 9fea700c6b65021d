"""Reports, grids, plots and the timing harness."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch
from PIL import Image

from distill_common.runtime import Timer
from distill_eval.grids import comparison_grid, image_grid
from distill_eval.plots import pareto_front, plot_quality_vs_latency, plot_quality_vs_steps
from distill_eval.reports import write_report
from distill_eval.timing import measure_latency

ROWS = [
    {"model": "teacher", "steps": 32, "fid": 10.0, "ms_per_image": 40.0},
    {"model": "student", "steps": 1, "fid": 30.0, "ms_per_image": 1.0},
    {"model": "student", "steps": 4, "fid": 20.0, "ms_per_image": 4.0},
    {"model": "bad", "steps": 4, "fid": 35.0, "ms_per_image": 5.0},
]


def test_pareto_front_excludes_dominated_points():
    pts = [(r["ms_per_image"], r["fid"]) for r in ROWS]
    assert sorted(pareto_front(pts)) == [0, 1, 2]
    assert pareto_front([(1, 1), (2, 2), (0.5, 3)]) == [2, 0]


def test_report_files(tmp_path):
    paths = write_report(ROWS, tmp_path, "bench", columns=["model", "steps", "fid"], meta={"protocol": "p"})
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["model"] == "teacher" and float(rows[2]["fid"]) == 20.0
    assert list(rows[0])[:3] == ["model", "steps", "fid"]
    assert json.loads(paths["json"].read_text())["meta"]["protocol"] == "p"
    md = paths["md"].read_text()
    assert "| model | steps | fid | ms_per_image |" in md and "| student | 4 | 20 | 4 |" in md


def test_plots_are_written(tmp_path):
    a = plot_quality_vs_steps(ROWS, "fid", tmp_path / "s.png")
    b = plot_quality_vs_latency(ROWS, "fid", tmp_path / "l.png")
    for p in (a, b):
        assert Image.open(p).size[0] > 300


def test_comparison_grid_layout(tmp_path):
    cols = [(f"model {i}", torch.rand(3, 3, 16, 16)) for i in range(4)]
    img = comparison_grid(cols, ["cat", "dog", "ship"], tmp_path / "g.png", cell_size=64)
    assert (tmp_path / "g.png").is_file()
    assert img.size[0] > 4 * 64 and img.size[1] > 3 * 64
    with pytest.raises(AssertionError, match="expected 3"):
        comparison_grid([("x", torch.rand(2, 3, 8, 8))], ["a", "b", "c"])
    assert image_grid(torch.rand(5, 3, 8, 8), ncols=5).size == (5 * 10 + 2, 12)


def test_measure_latency_counts_warmup_and_percentiles():
    calls = []
    timer = Timer("cpu")

    def fn():
        calls.append(1)
        with timer.section("denoiser"):
            time.sleep(0.01)

    res = measure_latency(fn, label="sleep", batch_size=2, warmup=2, repeats=5, stage_timer=timer)
    assert len(calls) == 7 and len(res.batch_seconds) == 5
    assert 10 <= res.batch_p50_ms < 60 and res.image_p50_ms == pytest.approx(res.batch_p50_ms / 2)
    assert res.batch_p95_ms >= res.batch_p50_ms
    assert res.stages["denoiser"] == pytest.approx(sum(res.batch_seconds) / 10, rel=0.3)
    s = res.summary()
    assert s["memory_kind"] == "process_rss" and s["peak_memory_mb"] > 0 and "torch_version" in s
