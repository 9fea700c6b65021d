"""Scale-out and tracking-overhead benchmark on the rf_cifar smoke preset (issue: registry/server/multi-process).

1. Throughput of one process vs two processes (``accelerate launch``; CPU processes use gloo, GPUs use NCCL):
   samples/s of the training loop, read from each run's ``stage.json``, and the scaling efficiency
   (two-process samples/s / (2 x one-process samples/s)).
2. The time the tracking layer adds per logged step: the same training with MLflow logging at the default
   interval vs logging off, in one process, best of ``--repeats``; target <= 2% of step time.

    python tools/bench_scaling_tracking.py [--steps 120] [--batch-size 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def teacher_args(out: Path, steps: int, batch: int, track: bool) -> list[str]:
    return ["rf", "train-teacher", "--preset", "smoke", "--train-steps", str(steps), "--train-batch-size", str(batch),
            "--train-checkpoint-every", str(steps), "--train-sample-every", "0", "--data-limit", "2048",
            "--train-device", "cpu" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "auto",
            "--output-dir", str(out), "--track" if track else "--no-track"]


def run(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def steps_per_second(out: Path) -> float:
    info = json.loads((out / "stage.json").read_text())["info"]
    return float(info["steps_per_second"][0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (split over the processes)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    console = Console()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    distill = [str(BIN / "python"), "-m", "distill_common.cli"]
    rows = []
    for procs in (1, 2):
        best = 0.0
        for r in range(args.repeats):
            out = tmp / f"p{procs}-r{r}"
            if procs == 1:
                cmd = distill[:]
            else:
                cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(procs),
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", str(29600 + r), "-m", "distill_common.cli"]
            run(cmd + teacher_args(out, args.steps, args.batch_size, track=False), tmp, env)
            best = max(best, steps_per_second(out) * args.batch_size)
        rows.append({"processes": procs, "samples_per_s": best})
    base = rows[0]["samples_per_s"]
    table = Table(title=f"rf_cifar smoke teacher, global batch {args.batch_size}, {args.steps} steps")
    for col in ("processes", "samples/s", "speed-up", "scaling efficiency"):
        table.add_column(col, justify="right")
    for row in rows:
        sp = row["samples_per_s"] / base
        table.add_row(str(row["processes"]), f"{row['samples_per_s']:.1f}", f"{sp:.2f}x",
                      f"{sp / row['processes']:.0%}")
    console.print(table)

    # tracking overhead: same single-process training with logging on (embedded sqlite store) and off
    timing = {}
    for track in (False, True):
        best = 0.0
        for r in range(args.repeats):
            out = tmp / f"track{int(track)}-r{r}"
            run(distill + teacher_args(out, args.steps, args.batch_size, track=track), tmp, env)
            best = max(best, steps_per_second(out))
        timing[track] = best
    step_ms_off, step_ms_on = 1000 / timing[False], 1000 / timing[True]
    smoke_log_every = 50
    table = Table(title="tracking overhead (logging every 50 steps, the smoke default)")
    for col in ("logging", "ms/step", "overhead"):
        table.add_column(col, justify="right")
    table.add_row("off", f"{step_ms_off:.2f}", "-")
    table.add_row("on", f"{step_ms_on:.2f}", f"{(step_ms_on / step_ms_off - 1):+.1%}")
    console.print(table)
    console.print(f"per logged step: {(step_ms_on - step_ms_off) * smoke_log_every:.1f} ms added "
                  f"(target: overhead <= 2% of step time)")


if __name__ == "__main__":
    main()
