"""The main job end to end at a tiny scale: ``distill rf pipeline`` trains, makes pairs, distils, evaluates,
registers, promotes and prints the table; a rerun skips every finished stage and reuses the registered versions."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distill_common import tracking
from distill_rf_cifar.cli import app

TINY = ["--teacher", "scratch", "--model-base-channels", "8", "--model-channel-mults", "1", "2", "--model-norm-groups", "4",
        "--model-attention-resolutions", "", "--no-model-mid-attention", "--model-dropout", "0",
        "--data-limit", "128", "--device", "cpu", "--sampling-steps", "2",
        "--teacher-steps", "4", "--teacher-batch-size", "16", "--teacher-sample-every", "0",
        "--num-pairs", "32", "--pairs-shard-size", "16", "--pairs-steps", "2",
        "--four-step-steps", "2", "--four-step-batch-size", "8", "--one-step-steps", "2", "--one-step-batch-size", "8",
        "--eval-teacher-steps", "1", "--no-eval-teacher-rk45", "--eval-student-steps", "1", "4",
        "--eval-num-images", "10", "--eval-reference-n", "20", "--eval-batch-size", "10"]


@pytest.mark.slow
def test_pipeline_end_to_end_and_rerun(tmp_path, mlflow_uri, data_root):
    out = tmp_path / "run"
    args = ["pipeline", "--preset", "smoke", *TINY, "--output-dir", str(out), "--data-root", str(data_root)]
    runner = CliRunner()
    result = runner.invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output

    # files
    for rel in ("teacher/generator/generator.json", "teacher/generator/model.safetensors", "pairs/manifest.json",
                "pairs/pairs-00000.safetensors", "pairs/pairs-00001.safetensors",
                "students/four_step/generator/generator.json", "students/one_step/generator/generator.json",
                "eval/fid_vs_nfe.csv", "eval/fid_vs_nfe.md", "eval/grid.png", "eval/plots/fid_vs_nfe.png",
                "eval/plots/fid_vs_latency.png", "summary.json", "pipeline_config.yaml"):
        assert (out / rel).is_file(), rel
    four = json.loads((out / "students/four_step/generator/generator.json").read_text())
    one = json.loads((out / "students/one_step/generator/generator.json").read_text())
    assert (four["default_steps"], one["default_steps"]) == (4, 1)
    assert (four["recipe"], four["progressive_round"], four["teacher_steps"]) == ("progressive", 2, 8)  # 16 -> 8 -> 4
    assert not (out / "students/four_step/rounds").exists()  # the pipeline scores it once, in its own sweep
    assert four["teacher_sha256"] == json.loads((out / "pairs/manifest.json").read_text())["teacher_sha256"]
    # the CFG scale the students carry is the one baked into their pairs, not the teacher's sampling default
    assert four["teacher_guidance"] == one["teacher_guidance"] == json.loads((out / "pairs/manifest.json").read_text())["guidance"]

    # the sweep and its protocol
    summary = json.loads((out / "summary.json").read_text())
    keys = [(r["model"], r["sampler"], r["steps"]) for r in summary["rows"]]
    assert keys == [("teacher", "euler", 1), ("teacher", "euler", 2), ("four_step", "euler", 4),
                    ("one_step", "euler", 1)]  # the demo scores each student at its own step count
    assert all(r["fid"] > 0 and r["ms_per_image"] > 0 for r in summary["rows"])
    assert all(0 <= r["fid_ci95_low"] <= r["fid_ci95_high"] for r in summary["rows"])  # every FID has its interval
    one_step = next(r for r in summary["rows"] if r["model"] == "one_step")
    # the scratch teacher samples at w = 1 but the pairs carry w = 2: no teacher row shares the student's guidance,
    # so only the equal-NFE comparison (the teacher at 1 plain step = 1 NFE) is made
    assert one_step["effective_guidance"] == 2.0 and "fid_vs_teacher" not in one_step
    assert one_step["fid_vs_teacher_nfe"] in ("better", "worse", "≈")
    assert summary["protocol"]["generated_n"] == 10 and summary["protocol"]["reference_n"] == 20
    assert list(summary["stage_seconds"]) == ["teacher", "pairs", "four_step", "one_step", "evaluation", "registry"]
    assert sum(summary["stage_seconds"].values()) <= summary["seconds"] + 1
    assert summary["protocol"]["reference_set"] == "cifar10-train"
    teacher_row = next(r for r in summary["rows"] if r["model"] == "teacher" and r["steps"] == 2)
    assert teacher_row["speedup_vs_teacher"] == pytest.approx(1.0)

    # registry: three versions, tagged with their numbers; the student champion is the best FID at <= 4 steps
    teachers = tracking.list_versions("rf_cifar-teacher")
    students = tracking.list_versions("rf_cifar-student")
    assert len(teachers) == 1 and len(students) == 2
    assert {v.tags["recipe"] for v in students} == {"progressive", "one_step"}  # the smoke preset's four-step recipe
    champion = tracking.version_by_alias("rf_cifar-student", "champion")
    best = min(students, key=lambda v: min(float(v.tags[f"eval.s{s}.fid"]) for s in (1, 4) if f"eval.s{s}.fid" in v.tags))
    assert champion is not None and champion.version == best.version
    assert tracking.version_by_alias("rf_cifar-teacher", "champion").version == teachers[0].version
    assert json.loads(champion.tags["eval.protocol"])["generated_n"] == 10
    assert float(champion.tags["eval.s4.fid_ci95_low"]) <= float(champion.tags["eval.s4.fid_ci95_high"])

    # the table, the grid path and the UI command
    text = result.output
    for needle in ("four_step", "one_step", "ms/img", "speed", "verdict", "★", "eval/grid.png",
                   f"mlflow ui --backend-store-uri {mlflow_uri}", "pipeline finished in"):
        assert needle in text, needle

    # rerun: every stage is skipped, versions are reused, nothing is regenerated
    mtime = (out / "eval/images/teacher_s1/00000.png").stat().st_mtime_ns
    again = runner.invoke(app, args, env={"COLUMNS": "160"})
    assert again.exit_code == 0, again.output
    assert again.output.count("already trained") == 3 and "nothing to do" in again.output
    assert len(tracking.list_versions("rf_cifar-student")) == 2
    assert (out / "eval/images/teacher_s1/00000.png").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_pipeline_distils_a_given_teacher_without_training_one(tmp_path, mlflow_uri, data_root):
    """--teacher FOLDER (as --teacher reference): no teacher training; the given generator is logged, registered and
    distilled, and its weights are the ones the pairs and students name."""
    from rf_fixtures import tiny_rf_generator

    from distill_rf_cifar.generator import weights_sha256

    given = tiny_rf_generator(tmp_path / "given", "teacher", default_steps=2, seed=3)
    out = tmp_path / "run"
    args = ["pipeline", "--preset", "smoke", *TINY[2:], "--teacher", str(given), "--output-dir", str(out),
            "--data-data-root", str(data_root)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert not (out / "teacher/checkpoints").exists()  # nothing trained
    sha = weights_sha256(given)
    assert json.loads((out / "pairs/manifest.json").read_text())["teacher_sha256"] == sha
    assert json.loads((out / "students/four_step/generator/generator.json").read_text())["teacher_sha256"] == sha
    (teacher,) = tracking.list_versions("rf_cifar-teacher")
    assert teacher.tags["generator.sha256"] == sha and "eval.s1.fid" in teacher.tags
