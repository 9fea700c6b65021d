"""Benchmark of the sd_student_prune students: UNet forward time vs parameters and MACs, and training speed
with cached vs uncached latents.

1. Forward: teacher, sd_small and sd_tiny UNets built from one SD 1.5-shaped config (random weights) are timed
on the same input (device-synchronised, warm-up, median of repeats). The target: each student's time ratio to
the teacher tracks its MAC ratio within 15%. On CPU the config is a mid-sized SD-shaped UNet (so compute, not
Python overhead, dominates); with ``--sd15`` (default on CUDA) it is SD 1.5's own UNet at 512x512 (64x64
latents). 2. Training: ``distill prune train`` (recipe v3, sd_small) for a few steps on the shared COCO
subset, with ``--data-cache`` off and on; steps/s is measured after the first two steps. On CPU the tiny SD
test pipeline at 64 px is used; with ``--sd15`` a random SD 1.5-sized pipeline (UNet, VAE, CLIP text encoder)
at 512 px.

Usage: ``python tools/bench_sd_prune.py [--device cuda] [--sd15] [--out results.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distill_common.models import SD15_UNET_CONFIG

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD15_UNET = SD15_UNET_CONFIG
# SD 1.5's block structure at 0.3 of its width, 32x32 latents: big enough that convolutions dominate on a CPU.
CPU_UNET = {
    **SD15_UNET,
    "block_out_channels": [96, 192, 384, 384],
    "cross_attention_dim": 192,
    "sample_size": 32,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(unet, inputs, device, clock) -> float:
    synchronize(device)
    start = clock()
    unet(*inputs)
    synchronize(device)
    return clock() - start


def pick_clock(device: torch.device):
    """Wall clock, except on a CPU with one torch thread: that thread's CPU time, which other processes on a
    shared machine do not inflate."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time, "thread CPU time (1 torch thread)"
    return time.perf_counter, "wall clock, device-synchronised"


def forward_benchmark(
    config: dict, device: torch.device, dtype: torch.dtype, batch: int, warmup: int, repeats: int
) -> list[dict]:
    """Median forward time per model; models are timed in interleaved rounds so load drift hits all alike."""
    from diffusers import UNet2DConditionModel

    from distill_sd_prune.architecture import build_student, count_parameters, unet_macs

    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(config).eval()
    latent = int(config["sample_size"])
    cross = int(config["cross_attention_dim"])
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
        torch.full((batch,), 500, device=device),
        torch.randn(batch, 77, cross, generator=g).to(device, dtype),
    )
    models, rows = {}, []
    for plan in ("none", "sd_small", "sd_tiny"):
        unet = teacher if plan == "none" else build_student(teacher, plan).unet
        macs = unet_macs(unet.config, latent, batch=batch)
        rows.append(
            {
                "model": "teacher" if plan == "none" else plan,
                "params": count_parameters(unet),
                "gmacs": macs.total / 1e9,
                "gmacs_conv_linear": macs.conv_linear / 1e9,
            }
        )
        models[rows[-1]["model"]] = unet.to(device, dtype).eval()
    clock, _ = pick_clock(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name, unet in models.items():
                seconds = time_forward(unet, inputs, device, clock)
                if round_index >= warmup:
                    times[name].append(seconds)
    for row in rows:
        row["ms"] = 1000 * statistics.median(times[row["model"]])
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["ms"] / base["ms"]
        row["macs_ratio"] = row["gmacs"] / base["gmacs"]
        row["params_ratio"] = row["params"] / base["params"]
        row["time_vs_macs"] = row["time_ratio"] / row["macs_ratio"]
        row["within_15pct"] = abs(row["time_vs_macs"] - 1) <= 0.15
    return rows


def sd15_pipeline_folder(root: Path) -> Path:
    """A random SD 1.5-sized diffusers folder (UNet 860M, VAE 84M, CLIP ViT-L text encoder 123M)."""
    from distill_common.models.tiny_sd import SD15_SIZED_SPEC, tiny_sd_folder

    return tiny_sd_folder(root, spec=SD15_SIZED_SPEC)


def training_benchmark(
    teacher: Path, resolution: int, device: str, steps: int, batch: int, precision: str, workdir: Path
) -> list[dict]:
    from distill_sd_prune.training.config import TrainConfig
    from distill_sd_prune.training.loop import train

    rows = []
    clock, _ = pick_clock(torch.device(device))
    for cached in (False, True):
        stamps: dict[int, float] = {}

        def on_step(step, metrics, stamps=stamps):
            synchronize(torch.device(device))
            stamps[step] = clock()

        cfg = TrainConfig(
            recipe="v3",
            teacher_model=str(teacher),
            output_dir=workdir / f"train-cache{int(cached)}",
            max_steps=steps,
            batch_size=batch,
            gradient_accumulation=1,
            checkpoint_every=10**6,
            track=False,
            resume=False,
            precision=precision,
            device=device,
        )
        cfg.data.resolution, cfg.data.cache, cfg.data.cache_dir = resolution, cached, workdir / "cache"
        cfg.data.num_workers = 2 if device == "cuda" else 0
        start = time.perf_counter()
        train(cfg, on_step=on_step, show_progress=False)
        timed = steps - 2
        rows.append(
            {
                "latents": "cached" if cached else "uncached",
                "resolution": resolution,
                "batch": batch,
                "steps_per_s": timed / (stamps[steps] - stamps[2]),
                "total_s_incl_setup": time.perf_counter() - start,
            }
        )
    rows[1]["speedup"] = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    keys = list(rows[0].keys() | set().union(*rows))
    keys = [k for k in rows[0]] + [k for k in keys if k not in rows[0]]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else f"{row.get(k, '')}" for k in keys]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sd15",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SD 1.5-sized configs at 512 px (default: on with CUDA)",
    )
    parser.add_argument("--batch", type=int, default=None, help="forward batch (default 4 on CUDA, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    sd15 = args.sd15 if args.sd15 is not None else device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batch = args.batch or (4 if device.type == "cuda" else 1)
    repeats = args.repeats or (20 if device.type == "cuda" else 7)
    from distill_common.runtime import environment_info

    results: dict = {
        "environment": environment_info(device),
        "dtype": str(dtype),
        "sd15": sd15,
        "clock": pick_clock(device)[1],
    }
    config = SD15_UNET if sd15 else CPU_UNET
    results["forward"] = forward_benchmark(
        config, device, dtype, batch, warmup=3 if device.type == "cuda" else 1, repeats=repeats
    )
    label = "SD 1.5 UNet, 64x64 latents (512 px)" if sd15 else "SD-shaped UNet at 0.3 width, 32x32 latents"
    print_rows(
        f"UNet forward, {label}, batch {batch}, {dtype}, {device}; {results['clock']}", results["forward"]
    )
    if not args.skip_train:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_sd_prune-"))
        if sd15:
            teacher, resolution, precision = sd15_pipeline_folder(workdir / "models"), 512, "fp16"
        else:
            from distill_common.models.tiny_sd import tiny_sd_folder

            teacher, resolution, precision = tiny_sd_folder(), 64, "fp32"
        train_batch = args.train_batch or (4 if sd15 else 2)
        results["training"] = training_benchmark(
            teacher, resolution, args.device, args.train_steps, train_batch, precision, workdir
        )
        print_rows(
            f"training steps/s (recipe v3, sd_small, {resolution}px, batch {train_batch})",
            results["training"],
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
