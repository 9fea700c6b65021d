"""`accelerate launch` with two CPU processes (gloo) running `flash train` on streamed WebDataset caption shards, as
on several GPUs: the shards split by rank, rank-0 logging and checkpoints, every rank's shard position in the
checkpoint, a cut-then-resumed run that ends on the uninterrupted run's LoRA, and a resume with another process
count refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from caption_shards import write_caption_shards
from safetensors.torch import load_file
from server_fixtures import checkout_env, launch_two_processes

from distill_common.checkpoint import load_training_state
from distill_common.data.shards import CaptionShardStream, expand_shards

pytestmark = pytest.mark.slow

NUM_SHARDS, PER_SHARD = 4, 2  # 4 steps x batch 1 x 2 ranks read all 8 samples once
TINY = ["--resolution", "64", "--batch-size", "1", "--gradient-accumulation-steps", "1", "--checkpointing-steps",
        "2", "--log-every", "1", "--validation-steps", "0", "--validation-teacher-steps", "2",
        "--validation-step-counts", "2", "--device", "cpu", "--precision", "fp32", "--learning-rate", "1e-3",
        "--seed", "0"]


def train_cmd(sd: Path, shards: str, out: Path, run: str, steps: int) -> list[str]:
    return ["flash", "train", "--base-model", str(sd), "--data-shards", shards, "--output-dir", str(out),
            "--run-name", run, "--max-steps", str(steps), *TINY]


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return launch_two_processes(args, cwd, HF_HUB_OFFLINE="1")


def positions(run: Path, step: int) -> list[dict]:
    return load_training_state(run / "lora" / f"checkpoint-{step}")["data"]


def shards_read(shards: str, pos: dict) -> set[str]:
    """The shard files a rank has opened by its stored position (epoch 0: this rank's part of the epoch's order)."""
    assert pos["epoch"] == 0
    order = CaptionShardStream(shards, resolution=64, seed=0, rank=pos["rank"],
                               world_size=pos["world_size"]).shards_of_epoch(0)
    return set(order[:pos["shard"] + (1 if pos["sample"] else 0)])


def test_two_process_flash_train_on_shards_splits_logs_once_and_resumes_exactly(tmp_path, coco_root, tiny_sd_path):
    from mlflow import MlflowClient

    shards = write_caption_shards(coco_root, tmp_path / "shards", num_shards=NUM_SHARDS, per_shard=PER_SHARD)
    out = tmp_path / "runs"
    proc = launch(train_cmd(tiny_sd_path, shards, out, "full", 4), tmp_path)
    assert proc.stdout.count("final LoRA:") == 1  # rank 1 neither reports nor logs the model

    full = out / "full"
    assert sorted(p.name for p in (full / "lora").iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]
    for step in (2, 4):
        pos = positions(full, step)  # one position per rank, gathered into rank 0's checkpoint
        assert [p["rank"] for p in pos] == [0, 1] and {p["world_size"] for p in pos} == {2}
        assert [p["num_yielded"] for p in pos] == [step, step]  # batch 1 per rank and step
        read = [shards_read(shards, p) for p in pos]
        assert not read[0] & read[1], read  # the ranks read disjoint shards
    assert read[0] | read[1] == set(expand_shards(shards))  # and together every shard once in 4 steps

    # cut after step 2 (a kill after the checkpoint), then resumed to step 4 with the same two processes
    launch(train_cmd(tiny_sd_path, shards, out, "cut", 2), tmp_path)
    cut = out / "cut"
    assert sorted(p.name for p in (cut / "lora").glob("checkpoint-*")) == ["checkpoint-2"]
    assert positions(cut, 2) == positions(full, 2)
    proc = launch(train_cmd(tiny_sd_path, shards, out, "cut", 4), tmp_path)
    assert "from checkpoint-2 (step 2)" in " ".join(proc.stdout.split())  # rich may wrap the line
    assert positions(cut, 4) == positions(full, 4)  # each rank continued at its own shard position
    want = load_file(full / "lora" / "final" / "pytorch_lora_weights.safetensors")
    got = load_file(cut / "lora" / "final" / "pytorch_lora_weights.safetensors")
    assert want.keys() == got.keys() and want
    # Bit-identical: both ranks seed alike and restore rank 0's RNG state (both ranks' states are equal, since
    # they draw the same numbers per step), the stream's crops depend on (seed, epoch, shard, sample) only, and
    # gloo's two-rank all-reduce sums in a fixed order.
    for key in want:
        assert torch.equal(got[key], want[key]), key

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lora_flash").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["cut", "full"]  # rank 1 opened none; the resume continued
    by_name = {r.info.run_name: r.info.run_id for r in runs}
    for name in by_name:
        steps = [m.step for m in client.get_metric_history(by_name[name], "train.loss")]
        assert sorted(steps) == [1, 2, 3, 4], (name, steps)  # once per step, not once per rank

    # one process cannot take over two ranks' positions: one line naming both counts, non-zero exit
    cmd = [sys.executable, "-m", "distill_common.cli", *train_cmd(tiny_sd_path, shards, out, "cut", 6)]
    single = subprocess.run(cmd, cwd=tmp_path, env=checkout_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert single.returncode != 0
    errors = [line for line in single.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "shard positions for 2 process(es), this run has 1" in errors[0], single.stderr[-3000:]
    assert "--num_processes 2" in errors[0] and "Traceback" not in single.stderr
    assert sorted(p.name for p in (cut / "lora").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
