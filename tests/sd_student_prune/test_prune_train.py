"""Each recipe trains a few steps on the shared COCO subset through ``distill prune train`` and logs every
loss term, its weight and every resolved option to MLflow; training resumes exactly after a kill; a NaN loss
stops it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from distill_common.config import flatten
from distill_common.errors import TrainingDivergedError
from distill_sd_prune.cli import app
from distill_sd_prune.training.config import TrainConfig
from distill_sd_prune.training.loop import train

ACTIVE_TERMS = {
    "v1": {"task", "output_kd", "feature_kd"},
    "v2.1": {"task"},
    "v2.2": {"task", "output_kd"},
    "v3": {"task", "output_kd", "feature_kd"},
}
RECIPE_FLAGS = {
    "v1": [],
    "v2.1": ["--eval-every", "2", "--eval-num-images", "2", "--eval-steps", "2", "--eval-batch-size", "2"],
    "v2.2": ["--eval-every", "0"],
    "v3": ["--gradient-accumulation", "2", "--batch-size", "1", "--data-resolution", "64", "--register"],
}


def tiny_args(tiny_sd_path, data_root, out, steps=2):
    return [
        "--teacher-model",
        str(tiny_sd_path),
        "--output-dir",
        str(out),
        "--data-root",
        str(data_root),
        "--data-limit",
        "4",
        "--max-steps",
        str(steps),
        "--batch-size",
        "2",
        "--log-every",
        "1",
    ]


def history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_each_recipe_trains_and_logs_every_term(tiny_sd_path, data_root, tmp_path, mlflow_uri):
    """One MLflow store (creating one costs seconds), one experiment per recipe."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    for recipe in ("v1", "v2.1", "v2.2", "v3"):
        out = tmp_path / recipe
        args = [
            "train",
            "--recipe",
            recipe,
            *tiny_args(tiny_sd_path, data_root, out),
            "--experiment",
            f"prune-{recipe}",
            *RECIPE_FLAGS[recipe],
        ]
        if recipe == "v3":  # train a student prepared by `distill prune prepare-unet`
            prepared = CliRunner().invoke(
                app,
                [
                    "prepare-unet",
                    "--teacher-model",
                    str(tiny_sd_path),
                    "--plan",
                    "sd_tiny",
                    "--resolution",
                    "64",
                    "--output-dir",
                    str(tmp_path / "prepared"),
                ],
            )
            assert prepared.exit_code == 0, prepared.output + repr(prepared.exception)
            args += ["--student-unet", str(tmp_path / "prepared")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output + repr(result.exception)
        (run,) = client.search_runs([client.get_experiment_by_name(f"prune-{recipe}").experiment_id])
        check_recipe_run(recipe, client, run, out)


def check_recipe_run(recipe, client, run, out):
    params, metrics = run.data.params, run.data.metrics
    resolved = flatten(yaml.safe_load((out / "train_config.yaml").read_text()))
    assert params["recipe"] == recipe and set(resolved) <= set(params)  # every resolved field is a parameter
    optional = ("student.unet", "data.limit", "run_name", "data.cache_dir", "data.shards")
    assert all(
        v is not None for k, v in resolved.items() if k not in optional
    )  # the recipe filled every field
    for term in ("task", "output_kd", "feature_kd"):
        assert (f"loss/{term}" in metrics and f"weight/{term}" in metrics) == (
            term in ACTIVE_TERMS[recipe]
        ), term
    assert "loss/total" in metrics and "lr" in metrics
    manifest = json.loads((out / "final" / "generator.json").read_text())
    assert manifest["family"] == "sd_student_prune" and manifest["recipe"] == recipe
    if recipe == "v1":
        assert history(client, run.info.run_id, "timestep/chain_length") == [1000.0, 25.0]
        assert (
            "loss/feature_kd/mid_block" in metrics and "ema/decay" in metrics and manifest["weights"] == "ema"
        )
    if recipe == "v2.1":
        assert {"eval/fid", "eval/kid", "eval/lpips_to_teacher"} <= set(metrics)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == [
            "samples/step_0000002.png"
        ]
    if recipe == "v2.2":
        assert history(client, run.info.run_id, "kd_alpha") == [1.0, 0.5]
        assert history(client, run.info.run_id, "caption_dropout/rate") == pytest.approx([0.0, 0.1])
    if recipe == "v3":
        checkpoint = json.loads((out / "checkpoints" / "checkpoint-2" / "checkpoint.json").read_text())
        assert checkpoint["micro_batch"] == 4  # 2 steps x 2 accumulated micro-batches
        (version,) = client.search_model_versions("name='sd_student_prune'")
        assert version.tags["budget"] == "sd_tiny" and int(version.tags["params"]) == manifest["params"]
        assert manifest["init"] == "slice" and manifest["plan"] == "sd_tiny"


class Killed(KeyboardInterrupt):
    pass


def small_config(tiny_sd_path, data_root, out, **overrides) -> TrainConfig:
    fields = dict(
        recipe="v1",
        teacher_model=str(tiny_sd_path),
        output_dir=out,
        max_steps=3,
        batch_size=2,
        checkpoint_every=1,
        track=False,
    )
    cfg = TrainConfig(**{**fields, **overrides})
    cfg.data.root, cfg.data.limit = data_root, 4
    cfg.schedule.ema_decay = 0.9
    return cfg


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_sd_path, data_root, tmp_path):
    straight = train(small_config(tiny_sd_path, data_root, tmp_path / "straight"), show_progress=False)

    def kill_at_two(step, metrics):
        if step == 2:
            raise Killed()

    with pytest.raises(Killed):
        train(
            small_config(tiny_sd_path, data_root, tmp_path / "killed"),
            on_step=kill_at_two,
            show_progress=False,
        )
    (tmp_path / "killed" / "checkpoints" / ".checkpoint-3.tmp-x").mkdir()  # debris of a kill mid-save
    resumed = train(small_config(tiny_sd_path, data_root, tmp_path / "killed"), show_progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == straight.steps == 3
    a = load_file(str(straight.final_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed.final_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.last_metrics["loss/total"] == straight.last_metrics["loss/total"]


def test_nan_loss_stops_training(tiny_sd_path, data_root, tmp_path, monkeypatch):
    from distill_sd_prune.training import loop

    monkeypatch.setattr(loop, "noise_mse", lambda prediction, target: prediction.sum() * float("nan"))
    cfg = small_config(tiny_sd_path, data_root, tmp_path / "nan", recipe="v2.1", max_steps=1)
    cfg.eval.every = 0
    with pytest.raises(TrainingDivergedError, match="loss became nan"):
        train(cfg, show_progress=False)
