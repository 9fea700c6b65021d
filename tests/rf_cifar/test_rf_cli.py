"""``distill rf`` commands: presets and errors, a tracked teacher run, kill-and-resume through the CLI, sampling."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from distill_common.errors import ConfigError
from distill_rf_cifar.cli import app

runner = CliRunner()
TINY = ["--model-base-channels", "8", "--model-channel-mults", "1", "2", "--model-norm-groups", "4",
        "--model-attention-resolutions", "", "--no-model-mid-attention", "--model-dropout", "0",
        "--data-limit", "64", "--train-batch-size", "8", "--train-checkpoint-every", "2", "--train-log-every", "1",
        "--train-device", "cpu", "--sampling-steps", "2"]


def test_presets_dry_run_and_unknown_recipe():
    result = runner.invoke(app, ["pipeline", "--preset", "paper", "--teacher", "scratch", "--dry-run"])
    assert result.exit_code == 0 and "base_channels: 128" in result.output and "steps: 800000" in result.output
    # a given teacher: the dry run shows its UNet, not the scratch-teacher sections that would not run
    result = runner.invoke(app, ["pipeline", "--dry-run"])
    assert result.exit_code == 0 and "1,541,891 parameters" in result.output and '"base_channels": 32' in result.output
    shown = yaml.safe_load(result.output)
    assert "model" not in shown and "teacher" not in shown and shown["teacher_source"] == "reference"
    result = runner.invoke(app, ["distill", "--recipe", "lcm", "--dry-run"])
    assert isinstance(result.exception, ConfigError)
    assert ("valid choices: 'adversarial', 'consistency', 'dmd', 'guided', 'guided_progressive', 'k_step', 'one_step', 'progressive', 'reflow'"
            in str(result.exception))
    result = runner.invoke(app, ["distill", "--recipe", "four_step", "--dry-run"])  # the k-step recipe's old name
    assert result.exit_code == 0 and yaml.safe_load(result.output)["recipe"] == "k_step"
    assert "four_step is now called k_step" in result.stderr
    result = runner.invoke(app, ["train-teacher", "--preset", "huge", "--dry-run"])
    assert isinstance(result.exception, ConfigError) and "'cpu', 'paper', 'smoke'" in str(result.exception)


def test_the_demo_distils_its_four_step_student_progressively_and_refuses_another_end():
    result = runner.invoke(app, ["pipeline", "--preset", "smoke", "--dry-run"])
    assert result.exit_code == 0 and "four_step_recipe: progressive" in result.output
    assert "progressive_start: 16" in result.output and "progressive_end: 4" in result.output
    result = runner.invoke(app, ["pipeline", "--preset", "smoke", "--options-progressive-end", "2", "--dry-run"])
    assert isinstance(result.exception, ConfigError)
    assert "pass --options-progressive-end 4" in str(result.exception)
    result = runner.invoke(app, ["pipeline", "--preset", "smoke", "--four-step-recipe", "reflow", "--dry-run"])
    assert isinstance(result.exception, ConfigError) and "'k_step', 'progressive'" in str(result.exception)


@pytest.mark.slow
def test_train_teacher_logs_to_mlflow_resumes_and_samples(tmp_path, mlflow_uri, data_root):
    from mlflow import MlflowClient

    out = tmp_path / "teacher"
    args = ["train-teacher", *TINY, "--output-dir", str(out), "--data-root", str(data_root), "--train-steps", "4",
            "--train-sample-every", "2", "--train-log-checkpoints"]
    killed = runner.invoke(app, [*args, "--train-stop-at-step", "3"])
    assert killed.exit_code == 0, killed.output
    assert not (out / "generator").exists() and json.loads((out / "stage.json").read_text())["finished"] is False
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    stage = json.loads((out / "stage.json").read_text())
    assert stage["finished"] and stage["model_uri"].startswith("models:/")
    assert (out / "generator" / "generator.json").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]

    client = MlflowClient()
    run = client.get_run(stage["run_id"])
    assert run.data.tags["resumes_run"]  # the second invocation knows it continued the first
    history = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == [4]  # steps 1-3 were logged by the killed run
    first = client.get_run(run.data.tags["resumes_run"])
    assert [m.step for m in client.get_metric_history(first.info.run_id, "train/loss")] == [1, 2, 3]
    assert any(k.startswith("train/loss_t") for k in run.data.metrics)
    assert run.data.params["model.parameters"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "checkpoints", "config.yaml"} <= artifacts

    again = runner.invoke(app, args)  # finished: nothing to do
    assert again.exit_code == 0 and "already trained" in again.output

    grid_dir = tmp_path / "samples"
    result = runner.invoke(app, ["sample", "--generator", str(out / "generator"), "--classes", "3", "5",
                                 "--per-class", "2", "--output-dir", str(grid_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in grid_dir.iterdir()) == ["class3_seed0.png", "class3_seed1.png", "class5_seed0.png",
                                                          "class5_seed1.png", "grid.png"]


@pytest.mark.parametrize("recipe", ["progressive", "reflow"])
def test_distill_command_exports_a_student_generator(recipe, tmp_path, teacher_dir, pairs_dir, data_root):
    out = tmp_path / recipe
    result = runner.invoke(app, ["distill", "--recipe", recipe, "--teacher", str(teacher_dir), "--pairs", str(pairs_dir),
                                 "--output-dir", str(out), "--no-track", "--train-steps", "3", "--train-batch-size", "8",
                                 "--train-device", "cpu", "--options-progressive-start", "4",
                                 "--options-progressive-end", "2", "--data-root", str(data_root), "--data-limit", "32",
                                 "--rounds-num-images", "0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "generator" / "generator.json").read_text())
    assert manifest["role"] == recipe and manifest["default_steps"] == {"progressive": 2, "reflow": 1}[recipe]
    assert manifest["default_guidance"] == 1.0 and len(manifest["teacher_sha256"]) == 64


def test_sample_reads_a_registered_generator_from_tracking_uri(tmp_path, mlflow_uri, teacher_dir, monkeypatch):
    """``rf sample --generator models:/NAME@ALIAS`` reads the store --tracking-uri names (or MLFLOW_TRACKING_URI), as
    the registry commands do; with neither, the missing ./mlflow.db is an error and is not created."""
    import os

    from distill_common import tracking

    with tracking.start_run("rf_test", "teacher") as run:
        version = tracking.register_model(tracking.log_generator_model(run, teacher_dir), "rf_cifar-sample")
    tracking.set_alias("rf_cifar-sample", "champion", version)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    def sample(folder: str, *extra: str, env: dict[str, str] | None = None):
        return runner.invoke(app, ["sample", "--generator", "models:/rf_cifar-sample@champion", "--classes", "3",
                                   "--per-class", "1", "--device", "cpu", "--output-dir", str(tmp_path / folder),
                                   *extra], env=env)

    out = sample("none")
    assert out.exit_code != 0 and "no MLflow store" in str(out.exception)
    assert list(elsewhere.iterdir()) == []  # reading created no store
    out = sample("by-option", "--tracking-uri", mlflow_uri)
    assert out.exit_code == 0, out.output
    assert (tmp_path / "by-option" / "class3_seed0.png").is_file() and (tmp_path / "by-option" / "grid.png").is_file()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the option applied to this command only
    out = sample("by-env", env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert out.exit_code == 0, out.output
    assert (tmp_path / "by-option" / "class3_seed0.png").read_bytes() == \
        (tmp_path / "by-env" / "class3_seed0.png").read_bytes()
    assert list(elsewhere.iterdir()) == []
    help_text = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "80"}).output
    assert "--tracking-uri" in help_text and "never created" in help_text
