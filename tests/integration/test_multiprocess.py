"""`accelerate launch` with two CPU processes (gloo) on the rf_cifar teacher: sharded data, rank-0 logging and
checkpoints, reduced metrics, and a killed-then-resumed run that ends on the uninterrupted run's weights."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from server_fixtures import launch_two_processes

pytestmark = pytest.mark.slow

TINY = ["--preset", "smoke", "--train-steps", "6", "--train-batch-size", "16", "--train-checkpoint-every", "3",
        "--train-log-every", "3", "--train-sample-every", "0", "--data-limit", "256", "--model-base-channels", "8",
        "--model-channel-mults", "1,2", "--model-norm-groups", "4", "--train-device", "cpu",
        "--train-precision", "fp32", "--sampling-steps", "2"]


def launch(out: Path, cwd: Path, data_root: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch_two_processes(["rf", "train-teacher", *TINY, "--output-dir", str(out), *extra], cwd,
                                DISTILL_DATA_ROOT=str(data_root))


def test_two_process_training_logs_once_and_resumes_exactly(tmp_path, data_root):
    from mlflow import MlflowClient

    launch(tmp_path / "full", tmp_path, data_root)
    launch(tmp_path / "cut", tmp_path, data_root, "--train-stop-at-step", "3")  # a kill after step 3
    cut_ckpts = sorted(p.name for p in (tmp_path / "cut").rglob("checkpoint-*"))
    assert cut_ckpts == ["checkpoint-3"]
    assert not (tmp_path / "cut" / "generator").exists()
    launch(tmp_path / "cut", tmp_path, data_root)  # resume to the end

    full = load_file(str(tmp_path / "full" / "generator" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "generator" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=k)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rf_cifar")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3  # one per launch: rank 1 never opened a run
    by_out = {r.data.params["output_dir"]: r for r in runs}
    hist = client.get_metric_history(by_out[str(tmp_path / "full")].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == [3, 6]  # logged once per logging step, not once per rank
