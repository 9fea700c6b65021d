"""``distill flash eval``: baseline vs LoRA student through the shared benchmark, with its report and MLflow run."""

from __future__ import annotations

import json

import pytest

from distill_common.cli import run_app
from distill_lora_flash.cli import app


@pytest.mark.slow
def test_eval_writes_the_report_and_logs_it(tiny_sd_path, tiny_lora, tiny_clip_path, prompts_file, tmp_path,
                                            mlflow_uri, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--base-model", str(tiny_sd_path), "--lora_path", str(tiny_lora), "--prompts_file",
            str(prompts_file), "--steps", "2", "4", "--baseline_steps", "3", "--num_images", "2", "--batch-size", "2",
            "--timing-repeats", "1", "--clip-model", str(tiny_clip_path), "--output_dir", str(out), "--device", "cpu"]
    try:
        run_app(app, args)
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "Flash LoRA evaluation" in stdout
    for name in ("flash_eval.csv", "flash_eval.json", "flash_eval.md", "benchmark.csv", "benchmark.md", "grid.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "flash_eval.json").read_text())
    rows = {(r["model"], r["steps"]): r for r in report["rows"]}
    assert set(rows) == {("baseline", 3), ("flash", 2), ("flash", 4)}
    base = rows[("baseline", 3)]
    assert base["lpips_to_teacher"] == 0.0 and base["speedup_vs_teacher"] == pytest.approx(1.0)
    assert base["guidance"] == 7.5 and rows[("flash", 2)]["guidance"] == 0.0
    for key in (("flash", 2), ("flash", 4)):
        row = rows[key]
        assert row["num_images"] == 4  # 2 prompts x 2 images, seeds 0..3
        assert row["lpips_to_teacher"] > 0  # other sampler and LoRA: not the baseline's image
        assert row["speedup_vs_teacher"] == pytest.approx(base["ms_per_image"] / row["ms_per_image"])
        assert row["quality_retention"] == pytest.approx(row["clip_score"] / base["clip_score"])
    assert report["meta"]["seeds"] == "0..3"

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "lora_flash_eval"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["kind"] == "evaluation"
    metrics = run.data.metrics
    assert metrics["flash.s2.quality_retention"] == pytest.approx(rows[("flash", 2)]["quality_retention"])
    assert "flash.s4.lpips_to_teacher" in metrics and "baseline.s3.ms_per_image" in metrics
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert "report/flash_eval.md" in artifacts


def test_eval_refuses_missing_prompts(capsys):
    try:
        run_app(app, ["eval", "--coco-prompts", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "no prompts" in capsys.readouterr().err
