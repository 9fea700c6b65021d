"""Tracking into a temporary sqlite store: run context, registry aliases, pyfunc generators, failures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch

from distill_common import generator as generator_mod
from distill_common import tracking
from distill_common.config import option
from distill_common.errors import ModelLoadError, TrackingError


@dataclass
class TinyConfig:
    learning_rate: float = option(1e-3, "LR.")
    steps: list[int] = option([1, 4], "Steps.")


def _mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_run_logs_config_versions_metrics_and_images(mlflow_uri, tmp_path):
    cfg = TinyConfig()
    with tracking.start_run("unit", "r1", config=cfg, tags={"recipe": "teacher"}, fallback_dir=tmp_path) as run:
        run.log_metrics({"loss": 0.5}, step=1)
        run.log_metrics({"loss": 0.25}, step=2)
        run.log_image(torch.rand(3, 8, 8), "samples/step_2.png")
        (tmp_path / "ckpt.txt").write_text("x")
        run.log_artifact(tmp_path / "ckpt.txt", "checkpoints")
    client = _mlflow_client()
    data = client.get_run(run.run_id).data
    assert data.params["learning_rate"] == "0.001" and data.params["steps"] == "[1, 4]"
    assert data.tags["recipe"] == "teacher"
    assert data.tags["version.distill-common"] == "0.1.0"
    assert "git_commit" in data.tags and "env.torch_version" in data.tags
    history = client.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.5), (2, 0.25)]
    arts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "samples", "checkpoints"} <= arts
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert mlflow_uri.startswith("sqlite:///")


def test_failed_run_is_marked_failed(mlflow_uri):
    with pytest.raises(RuntimeError):
        with tracking.start_run("unit", "boom") as run:
            raise RuntimeError("x")
    assert _mlflow_client().get_run(run.run_id).info.status == "FAILED"


def test_disabled_tracking_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tracking.start_run("unit", enabled=False) as run:
        run.log_metrics({"a": 1.0}, step=0)
    assert run.run_id is None and not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_fails_fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.time()
    with pytest.raises(TrackingError, match="unreachable"):
        with tracking.start_run("unit"):
            pass
    assert time.time() - start < 10


def test_logging_failure_keeps_values_on_disk_and_relogs(mlflow_uri, tmp_path, monkeypatch):
    with tracking.start_run("unit", "flaky", fallback_dir=tmp_path) as run:
        real = run.client.log_batch
        monkeypatch.setattr(run.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
        with pytest.warns(UserWarning, match="logging failed"):
            run.log_metrics({"loss": 1.5}, step=7)
        monkeypatch.setattr(run.client, "log_batch", real)
    assert run.failed_calls == 1
    assert "distill registry relog" in run.report_failures()
    lines = run.unlogged_path.read_text().splitlines()
    assert json.loads(lines[0])["metrics"] == {"loss": 1.5}
    report = tracking.relog(run.unlogged_path)
    assert (report.sent, report.dropped) == (1, [])
    assert not run.unlogged_path.exists()  # everything sent: nothing left to relog
    hist = _mlflow_client().get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(7, 1.5)]


def test_registry_alias_round_trip_and_best_version(mlflow_uri, logged_generator):
    v1 = tracking.register_model(logged_generator(1.0), "noise", tags={"role": "teacher"})
    v2 = tracking.register_model(logged_generator(2.0), "noise", description="student")
    assert (v1, v2) == ("1", "2")
    tracking.set_alias("noise", tracking.CHAMPION, v1)
    assert tracking.version_by_alias("noise", "champion").version == "1"
    tracking.set_alias("noise", tracking.CHAMPION, v2)  # moving an alias
    info = tracking.version_by_alias("noise", "champion")
    assert info.version == "2" and info.description == "student"
    assert tracking.version_by_alias("noise", "nope") is None
    tracking.set_version_tags("noise", v1, {"eval.fid": 10.0})
    tracking.set_version_tags("noise", v2, {"eval.fid": 7.5})
    assert tracking.best_version("noise", "fid").version == "2"
    assert tracking.best_version("noise", "fid", lower_is_better=False).version == "1"
    assert tracking.best_version("noise", "fid", where={"role": "teacher"}).version == "1"
    assert "noise" in tracking.list_models()


def test_pyfunc_generator_loads_by_alias_and_generates(mlflow_uri, logged_generator):
    import mlflow.pyfunc
    import pandas as pd

    version = tracking.register_model(logged_generator(3.0), "noise")
    tracking.set_alias("noise", "champion", version)
    model = mlflow.pyfunc.load_model("models:/noise@champion")
    out = model.predict(pd.DataFrame({"condition": [0, 5], "seed": [11, 12]}))
    assert list(out.columns) == ["condition", "seed", "steps", "image"]
    img = tracking.decode_image(out["image"][0])
    assert img.size == (32, 32)
    gen = model.unwrap_python_model().generator
    direct = gen.generate([0], 2, [11])
    assert direct.shape == (1, 3, 32, 32) and 0 <= direct.min() and direct.max() <= 1
    # the same seed gives the same image through both paths (PNG quantisation aside)
    import numpy as np

    assert np.abs(np.asarray(img) / 255.0 - direct[0].permute(1, 2, 0).numpy()).max() < 1 / 255 + 1e-6
    # load_generator resolves the registry URI too
    again = generator_mod.load_generator("models:/noise@champion")
    assert torch.equal(again.generate([5], 2, [12]), gen.generate([5], 2, [12]))


def test_missing_generator_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        generator_mod.load_generator(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="generator.json"):
        generator_mod.load_generator(tmp_path / "empty")
