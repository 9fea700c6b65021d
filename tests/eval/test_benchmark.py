"""`distill eval benchmark` end to end on a stand-in generator: files, MLflow links, registry stamps, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from stand_in_generators import NoiseGenerator
from typer.testing import CliRunner

from distill_common import promotion, tracking
from distill_eval.cli import app


@pytest.mark.slow
def test_benchmark_end_to_end_and_resume(mlflow_uri, logged_generator, data_root, tmp_path):

    teacher = tracking.register_model(logged_generator(1.0), "noise", tags={"role": "teacher"})
    student = tracking.register_model(logged_generator(1.5), "noise", tags={"role": "student"})
    out = tmp_path / "bench"
    args = ["benchmark", "--teacher", f"models:/noise/{teacher}", "--generators", f"student=models:/noise/{student}",
            "--steps", "1", "2", "--num-images", "24", "--reference", "cifar10-test", "--reference-n", "48",
            "--batch-size", "12", "--timing-repeats", "2", "--output-dir", str(out), "--data-root", str(data_root)]
    runner = CliRunner()
    NoiseGenerator.images_generated = 0
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    generated_first = NoiseGenerator.images_generated
    # 3 configurations x 24 images, plus warm-up and timed batches of 12
    assert generated_first == 3 * 24 + 3 * 12 * 3

    for name in ("benchmark.csv", "benchmark.json", "benchmark.md", "grid.png", "plots/fid_vs_steps.png",
                 "plots/fid_vs_latency.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "benchmark.json").read_text())
    rows = report["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher", 2), ("student", 1), ("student", 2)]
    assert rows[0]["lpips_to_teacher"] == 0.0 and rows[1]["lpips_to_teacher"] > 0
    assert all(r["fid"] > 0 and r["ms_per_image"] > 0 for r in rows)
    proto = report["meta"]["protocol"]
    assert proto["reference_set"] == "cifar10-test" and proto["reference_n"] == 48 and proto["generated_n"] == 24
    assert proto["resolution"] == 32
    assert proto["resize"] == "none" and proto["feature_precision"] == "bf16"  # resize picked for 32 px CIFAR; bf16: the default protocol
    # every FID carries its interval; the tables print FID [low, high] and mark overlaps with the best row
    assert all(0 <= r["fid_ci95_low"] <= r["fid_ci95_high"] for r in rows)
    assert {r["fid_vs_best"] for r in rows} <= {"best", "≈ best", "worse"}
    assert sum(r["fid_vs_best"] == "best" for r in rows) == 1
    assert all(r["kid_std"] > 0 for r in rows)  # a real spread over subsets of 12 of the 24 images
    md = (out / "benchmark.md").read_text()
    assert f"{rows[1]['fid']:.2f} [{rows[1]['fid_ci95_low']:.2f}, {rows[1]['fid_ci95_high']:.2f}]" in md
    assert "bootstrap interval (FID ± 1.96 bootstrap SE)" in md and "fid_ci95_low" in (out / "benchmark.csv").read_text()

    # the evaluation run is linked to the versions, and the versions carry the numbers
    info = {v.version: v for v in tracking.list_versions("noise")}[student]
    assert float(info.tags["eval.s1.fid"]) == pytest.approx(rows[1]["fid"], rel=1e-6)
    assert float(info.tags["eval.s1.fid_ci95_low"]) == pytest.approx(rows[1]["fid_ci95_low"], rel=1e-6)
    assert float(info.tags["eval.s1.fid_ci95_high"]) == pytest.approx(rows[1]["fid_ci95_high"], rel=1e-6)
    from mlflow import MlflowClient

    run = MlflowClient().get_run(info.tags["eval.run_id"])
    assert f"models:/noise/{student}" in run.data.tags["evaluated"]
    assert run.data.tags["protocol.reference_set"] == "cifar10-test"
    assert sorted(a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")) == [
        "plots/fid_vs_latency.png", "plots/fid_vs_steps.png"]
    assert any(k.startswith("student.s1.fid") for k in run.data.metrics)
    decision = promotion.decide("noise", "fid", max_steps=2)
    assert decision.chosen.version in (teacher, student)

    # resume: remove 5 images of one configuration; only those are regenerated
    for i in range(5):
        (out / "images" / "student_s2" / f"{i:05d}.png").unlink()
    NoiseGenerator.images_generated = 0
    result = runner.invoke(app, args + ["--no-track"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert NoiseGenerator.images_generated == 5 + 3 * 12 * 3
    again = json.loads((out / "benchmark.json").read_text())["rows"]
    assert again[2]["fid"] == pytest.approx(rows[2]["fid"], rel=1e-5)  # same seeds → same images → same FID


def test_benchmark_needs_something_to_evaluate(tmp_path):
    result = CliRunner().invoke(app, ["benchmark", "--teacher", "none", "--output-dir", str(tmp_path)])
    assert result.exit_code != 0 and "--generators" in str(result.exception)


def test_benchmark_rows_carry_intervals_markers_and_the_protocol_resize(tmp_path, data_root, monkeypatch):
    """Fast path through run_benchmark: a cheap stand-in feature extractor instead of Inception, no tracking."""
    import json as _json

    import torch.nn.functional as F
    from torch import nn

    import distill_eval.inception as inception
    from distill_eval.benchmark import BenchmarkConfig, run_benchmark

    class Projection(nn.Module):
        def __init__(self, resize="none", precision="fp32", **_):
            super().__init__()
            self.resize, self.precision, self.extractor_hash = resize, precision, "proj00000000"
            self.linear = nn.Linear(48, 64)
            torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

        calls = 0

        def forward(self, images):
            Projection.calls += images.shape[0]
            images = images if images.dtype == torch.uint8 else (images * 255).round()
            return self.linear(F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)).detach()

    monkeypatch.setattr(inception, "InceptionFeatureExtractor", Projection)
    monkeypatch.setattr("distill_eval.benchmark._lpips", lambda net: lambda a, b: (a - b).abs().mean((1, 2, 3)))
    folders = {}
    for label, scale in (("teacher", 1.0), ("student", 2.5)):
        folders[label] = tmp_path / label
        folders[label].mkdir()
        (folders[label] / "generator.json").write_text(_json.dumps({"scale": scale}))
    cfg = BenchmarkConfig(teacher=f"teacher={folders['teacher']}", generators=[f"student={folders['student']}"],
                          steps=[2], num_images=40, reference="cifar10-test", reference_n=64, batch_size=20,
                          timing_repeats=1, output_dir=tmp_path / "out", data_root=data_root, track=False,
                          bootstrap_resamples=50, device="cpu", feature_precision="fp32")
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    result = run_benchmark(cfg, loader=lambda uri: NoiseGenerator(Path(uri)))
    assert result.protocol["resize"] == "none" and result.protocol["feature_precision"] == "fp32"
    teacher, student = result.rows
    assert all(0 <= r["fid_ci95_low"] <= r["fid_ci95_high"] and r["kid_std"] > 0 for r in result.rows)
    assert {teacher["fid_vs_best"], student["fid_vs_best"]} <= {"best", "≈ best", "worse"}
    assert student["fid_vs_teacher"] in ("better", "worse", "≈")  # teacher and student both at 2 steps
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert f"{student['fid']:.2f} [{student['fid_ci95_low']:.2f}, {student['fid_ci95_high']:.2f}]" in md
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in result.plot_paths) == [
        "plots/fid_vs_latency.png", "plots/fid_vs_steps.png"]

    # a re-run reads each folder's Inception features from its cache: no generated image goes through the network
    Projection.calls = 0
    again = run_benchmark(cfg, loader=lambda uri: NoiseGenerator(Path(uri)))
    assert Projection.calls == 0
    assert [r["fid"] for r in again.rows] == pytest.approx([r["fid"] for r in result.rows], rel=1e-6)
    # new student weights regenerate its images and recompute only its features; the teacher's stay cached
    (folders["student"] / "generator.json").write_text(_json.dumps({"scale": 3.5}))
    Projection.calls = 0
    changed = run_benchmark(cfg, loader=lambda uri: NoiseGenerator(Path(uri)))
    assert Projection.calls == 40 and changed.rows[1]["fid"] != pytest.approx(student["fid"], rel=1e-3)
    assert changed.rows[0]["fid"] == pytest.approx(teacher["fid"], rel=1e-6)


def test_cached_features_are_keyed_by_the_images_the_count_and_the_extractor(tmp_path):
    from distill_eval.benchmark import CACHE_KEY_FILE, FEATURE_CACHE_FILE, cached_features

    class Extractor:
        extractor_hash, precision, resize = "abc", "bf16", "none"

    computed = []

    def compute(value):
        def run():
            computed.append(value)
            return torch.full((4, 8), float(value))
        return run

    folder = tmp_path / "images"
    folder.mkdir()
    assert cached_features(folder, 4, Extractor(), compute(1)).mean() == 1  # no image key: never cached
    assert not (folder / FEATURE_CACHE_FILE).exists()
    (folder / CACHE_KEY_FILE).write_text(json.dumps({"weights": "w1", "steps": 2}))
    assert cached_features(folder, 4, Extractor(), compute(2)).mean() == 2
    assert cached_features(folder, 4, Extractor(), compute(3)).mean() == 2  # read back
    assert cached_features(folder, 5, Extractor(), compute(4)).mean() == 4  # another count
    other = Extractor()
    other.precision = "fp32"
    assert cached_features(folder, 5, other, compute(5)).mean() == 5  # another forward precision
    (folder / CACHE_KEY_FILE).write_text(json.dumps({"weights": "w2", "steps": 2}))
    assert cached_features(folder, 5, other, compute(6)).mean() == 6  # other images
    (folder / FEATURE_CACHE_FILE).write_bytes(b"garbage")
    assert cached_features(folder, 5, other, compute(7)).mean() == 7  # a garbled file is recomputed
    assert cached_features(folder, 5, other, compute(8)).mean() == 7
    assert computed == [1, 2, 4, 5, 6, 7]
