"""A tracking server that dies mid-run: training finishes, checkpoints stay on disk, the command says what
could not be logged and how to re-log it, and `distill registry relog` sends it once a server is back."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from server_fixtures import REPO, free_port, start_server, stop_pid

pytestmark = pytest.mark.slow

TRAIN = ["rf", "train-teacher", "--preset", "smoke", "--train-steps", "40", "--train-batch-size", "8",
         "--train-checkpoint-every", "10", "--train-log-every", "2", "--train-sample-every", "0", "--data-limit", "128",
         "--model-base-channels", "8", "--model-channel-mults", "1,2", "--model-norm-groups", "4",
         "--train-device", "cpu", "--train-precision", "fp32", "--sampling-steps", "2"]


def test_training_survives_a_dead_server_and_relogs(tmp_path, data_root):
    from mlflow import MlflowClient

    port = free_port()
    pid = start_server(tmp_path / "server", port)
    uri = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, DISTILL_DATA_ROOT=str(data_root))
    out = tmp_path / "teacher"
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "distill"), *TRAIN, "--output-dir", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not list(out.rglob("checkpoint-10")):  # training is under way and has logged metrics
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.5)
    finally:
        stop_pid(pid)  # the server dies mid-run
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert (out / "generator" / "model.safetensors").is_file()
    assert max(int(p.name.split("-")[1]) for p in out.rglob("checkpoint-*")) == 40
    unlogged = out / "unlogged_metrics.jsonl"
    assert unlogged.is_file()
    flat = " ".join(output.split())
    assert "could not be logged" in flat or "failed" in flat
    assert "distill registry relog" in flat and "unlogged_metrics.jsonl" in flat

    # the server comes back on the same store; relog sends what it missed
    pid = start_server(tmp_path / "server", port)
    try:
        relog = subprocess.run([str(REPO / ".venv" / "bin" / "distill"), "registry", "relog", str(unlogged)],
                               env=env, capture_output=True, text=True, timeout=300)
        assert relog.returncode == 0, relog.stderr[-2000:]
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("rf_cifar").experiment_id])[0]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert steps == list(range(2, 41, 2))  # every logging step is there, before and after the outage
    finally:
        stop_pid(pid)
