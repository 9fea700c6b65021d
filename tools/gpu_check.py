"""One-command GPU check: every trainer for a few steps at real size in mixed precision, sampling speed against
the ratio of network evaluations, and two processes over NCCL when two GPUs are present. One table; exit 1 on
any failure. No hub and no data set: random weights at real sizes and a few synthetic images.

Checks (each runs the workspace's own command through its CLI, in this process):

- ``rf train-teacher --preset paper``: DDPM's 35.7M-parameter CIFAR-10 UNet, batch 128.
- ``prune train --recipe v3``: an SD 1.5-sized teacher (random weights: UNet 860M, VAE, CLIP ViT-L text encoder)
  distilled into ``sd_small`` at 512 px (64x64 latents).
- ``flash train``: a LoRA student on the same SD 1.5-sized model at 512 px.
- sampling: the rf teacher at 32 Euler steps vs 4 and 1; SD 30-step CFG vs the LoRA student's 4 and 2 LCM steps;
  speed-up next to the ratio of UNet evaluations (CFG counts two per step).
- NCCL: ``accelerate launch --multi_gpu --num_processes 2 ... rf train-teacher`` (skipped with fewer than 2 GPUs).

``--cpu-smoke`` runs the same code paths at tiny sizes on the CPU in fp32 (a test runs it, so the script keeps
working). Usage: ``tools/gpu_check.sh [--cpu-smoke] [--steps N] [--workdir DIR] [--precision bf16|fp16]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # nothing is tracked (--no-track everywhere)

import torch  # noqa: E402

from distill_common.models.tiny_sd import SD15_SIZED_SPEC, TinySDSpec, tiny_sd_folder  # noqa: E402
from distill_common.runtime import timed  # noqa: E402

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Scale:
    """Sizes of one run: ``full`` on a CUDA GPU, ``smoke`` on the CPU."""

    name: str
    device: str
    precision: str  # of every trainer (fp32 in the CPU smoke)
    steps: int  # optimiser steps of each trainer
    rf_flags: list[str]  # added to `rf train-teacher --preset paper`
    rf_batch: int
    rf_teacher_steps: int
    sd_spec: TinySDSpec
    sd_batch: int
    lora_rank: int
    sd_baseline_steps: int
    sampling_batch_rf: int
    sampling_batch_sd: int


def full_scale(precision: str, steps: int) -> Scale:
    return Scale("full", "cuda", precision, steps, [], 128, 32, SD15_SIZED_SPEC, 2, 64, 30, 256, 4)


def smoke_scale(steps: int) -> Scale:
    tiny_rf = ["--model-base-channels", "8", "--model-channel-mults", "1,2", "--model-res-blocks", "1",
               "--model-attention-resolutions", "16", "--model-norm-groups", "4"]
    return Scale("smoke", "cpu", "fp32", steps, tiny_rf, 4, 8, TinySDSpec(), 1, 4, 4, 4, 1)


@dataclass
class Check:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, fn: Callable[[], list[dict[str, Any]] | dict[str, Any]]) -> Any:
        """Run one check; a failure becomes a FAIL row (with its last traceback line) and the others still run."""
        start = time.perf_counter()
        try:
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, none stops the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exc()
            self.rows.append({"check": name, "result": "FAIL", "seconds": round(time.perf_counter() - start, 1),
                              "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]})
            return None
        for row in out if isinstance(out, list) else [out]:
            self.rows.append({"check": name, "result": row.pop("result", "ok"),
                              "seconds": round(time.perf_counter() - start, 1), **row})
        return out

    @property
    def failed(self) -> bool:
        return any(r["result"] == "FAIL" for r in self.rows)


def cli(argv: list[str]) -> None:
    """Run ``distill ARGV`` in this process, as the console script would (errors raise)."""
    import typer

    from distill_common import cli as umbrella

    if not getattr(umbrella, "_gpu_check_registered", False):
        umbrella._register_subcommands()
        umbrella._gpu_check_registered = True
    code = typer.main.get_command(umbrella.app).main(argv, prog_name="distill", standalone_mode=False)
    if code not in (None, 0):
        raise RuntimeError(f"distill {' '.join(argv[:2])} exited with {code}")


# ----------------------------------------------------------------------------------------- synthetic data


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def cifar_folder(root: Path, per_class: int) -> Path:
    """``root/train/<class>/*.jpg``: the CIFAR-10 image-folder layout (``--data-source folder``)."""
    for k, name in enumerate(CIFAR_CLASSES):
        write_images(root / "train" / name, per_class, 32, seed=k)
    return root


def coco_folder(root: Path, n: int, size: int) -> Path:
    """``root/coco2017``: COCO 2017 caption layout (annotations/captions_train2017.json + train2017/*.jpg)."""
    coco = root / "coco2017"
    paths = write_images(coco / "train2017", n, size)
    images = [{"id": i + 1, "file_name": p.name, "height": size, "width": size} for i, p in enumerate(paths)]
    anns = [{"id": i + 1, "image_id": i + 1, "caption": f"a photo of thing number {i}"} for i in range(n)]
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    (coco / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return root


def captioned_folder(root: Path, n: int, size: int) -> Path:
    """``images/*.jpg`` + ``captions/*.txt`` (``flash train --data-dir``)."""
    for i, p in enumerate(write_images(root / "images", n, size)):
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"{p.stem}.txt").write_text(f"a photo of thing number {i}")
    return root


# ----------------------------------------------------------------------------------------------- checks


def prepare(scale: Scale, work: Path, data: dict[str, Path]) -> dict[str, Any]:
    """Synthetic CIFAR-10 / COCO / captioned folders and the random SD pipeline (built once, then cached)."""
    size, n = scale.sd_spec.image_size, 4 * scale.sd_batch
    data["cifar"] = cifar_folder(work / "cifar", 32 if scale.name == "full" else 2)
    data["coco"] = coco_folder(work / "coco", n, size)
    data["captions"] = captioned_folder(work / "captions", n, size)
    data["sd"] = tiny_sd_folder(work / "models", spec=scale.sd_spec)
    return {"size": f"SD {size} px ({scale.sd_spec.block_out_channels})", "precision": "fp32",
            "detail": "CIFAR-10 folder, COCO captions, captioned folder: random images"}


def rf_train(scale: Scale, work: Path, cifar: Path) -> dict[str, Any]:
    out = work / "rf_teacher"
    cli(["rf", "train-teacher", "--preset", "paper", *scale.rf_flags, "--train-steps", str(scale.steps),
         "--train-batch-size", str(scale.rf_batch), "--train-precision", scale.precision,
         "--train-device", scale.device, "--train-checkpoint-every", str(scale.steps), "--train-log-every", "1",
         "--data-source", "folder", "--data-root", str(cifar), "--no-track", "--output-dir", str(out)])
    from distill_rf_cifar.generator import load_model

    params = sum(p.numel() for p in load_model(out / "generator").parameters())
    return {"size": f"{params / 1e6:.2f}M params, batch {scale.rf_batch}", "precision": scale.precision,
            "detail": f"{scale.steps} steps, generator written"}


def rf_sampling(scale: Scale, work: Path) -> list[dict[str, Any]]:
    from distill_common.generator import load_generator

    gen = load_generator(work / "rf_teacher" / "generator", device=scale.device)
    n = scale.sampling_batch_rf
    classes, seeds = [i % 10 for i in range(n)], list(range(n))
    teacher = scale.rf_teacher_steps
    times = {}
    for steps in (teacher, 4, 1):
        gen.generate(classes[:2], min(steps, 2), seeds[:2], sampler="euler")  # warm-up
        with timed(gen.device) as t:
            images = gen.generate(classes, steps, seeds, sampler="euler")
        if not torch.isfinite(images).all():
            raise FloatingPointError(f"rf samples at {steps} steps are not finite")
        times[steps] = t["seconds"] / n
    rows = []
    for steps in (4, 1):
        speedup, nfe = times[teacher] / times[steps], teacher / steps
        rows.append({"size": f"{n} images 32 px", "precision": "fp32",
                     "detail": f"{steps} vs {teacher} Euler steps: {speedup:.2f}x, NFE ratio {nfe:g} "
                               f"({speedup / nfe:.2f}); {times[steps] * 1e3:.2f} ms/img"})
    return rows


def prune_train(scale: Scale, work: Path, sd: Path, coco: Path) -> dict[str, Any]:
    out = work / "prune"
    size = scale.sd_spec.image_size
    cli(["prune", "train", "--recipe", "v3", "--teacher-model", str(sd), "--student-plan", "sd_small",
         "--max-steps", str(scale.steps), "--batch-size", str(scale.sd_batch), "--gradient-accumulation", "1",
         "--precision", scale.precision, "--device", scale.device, "--data-root", str(coco),
         "--data-resolution", str(size), "--eval-every", "0", "--checkpoint-every", str(scale.steps),
         "--no-track", "--no-register", "--no-resume", "--output-dir", str(out)])
    info = json.loads((out / "final" / "generator.json").read_text())
    return {"size": f"{info['params'] / 1e6:.0f}M student ({info['budget']}), {size} px, batch {scale.sd_batch}",
            "precision": scale.precision, "detail": f"{scale.steps} steps, {info['macs'] / 1e9:.0f} GMACs/call"}


def flash_train(scale: Scale, work: Path, sd: Path, captions: Path) -> dict[str, Any]:
    out = work / "flash"
    prompts = work / "validation_prompts.txt"
    prompts.write_text("a red bus\n")
    size = scale.sd_spec.image_size
    cli(["flash", "train", "--base-model", str(sd), "--data-dir", str(captions), "--resolution", str(size),
         "--lora-rank", str(scale.lora_rank), "--batch-size", str(scale.sd_batch),
         "--gradient-accumulation-steps", "1", "--max-steps", str(scale.steps), "--precision", scale.precision,
         "--device", scale.device, "--checkpointing-steps", str(scale.steps), "--validation-steps", "0",
         "--validation-prompts-file", str(prompts), "--validation-step-counts", "2",
         "--validation-teacher-steps", str(scale.sd_baseline_steps), "--no-track", "--register-name", "",
         "--output-dir", str(out)])
    generator = next(out.rglob("generator.json")).parent
    (work / "flash_generator").write_text(str(generator))
    lora = json.loads((generator / "generator.json").read_text())
    unet = "SD 1.5-sized UNet" if scale.sd_spec == SD15_SIZED_SPEC else f"UNet {scale.sd_spec.block_out_channels}"
    return {"size": f"LoRA rank {scale.lora_rank} on {unet}, {size} px, batch {scale.sd_batch}",
            "precision": scale.precision, "detail": f"{scale.steps} steps, lcm grid {lora.get('lcm_original_steps')}"}


def sd_sampling(scale: Scale, work: Path) -> list[dict[str, Any]]:
    from distill_common.generator import load_generator
    from distill_lora_flash.generation import generate_timed
    from distill_lora_flash.generator import FlashGenerator

    precision = "fp32" if scale.device == "cpu" else "fp16"
    student = load_generator(Path((work / "flash_generator").read_text()), device=scale.device, precision=precision)
    baseline = FlashGenerator(student.pipe, None, default_steps=scale.sd_baseline_steps, default_guidance=7.5,
                              label="baseline")
    n = scale.sampling_batch_sd
    prompts, seeds = ["a red bus"] * n, list(range(n))
    base = generate_timed(baseline, prompts, seeds, scale.sd_baseline_steps, 7.5, n)
    base_rows = baseline.unet_evaluations(scale.sd_baseline_steps, 7.5)[1]
    rows = []
    for steps in (4, 2):
        run = generate_timed(student, prompts, seeds, steps, 0.0, n)
        if not torch.isfinite(run.images).all():
            raise FloatingPointError(f"student images at {steps} steps are not finite")
        speedup = base.seconds_per_image / run.seconds_per_image
        nfe = base_rows / student.unet_evaluations(steps, 0.0)[1]
        rows.append({"size": f"{n} images {student.resolution} px", "precision": precision,
                     "detail": f"LCM {steps} vs {scale.sd_baseline_steps}-step CFG: {speedup:.2f}x, UNet-evaluation "
                               f"ratio {nfe:g} ({speedup / nfe:.2f}); {run.seconds_per_image * 1e3:.0f} ms/img "
                               "(incl. text encoder and VAE)"})
    return rows


def nccl_two_processes(scale: Scale, work: Path, cifar: Path) -> dict[str, Any]:
    gpus = torch.cuda.device_count() if scale.device == "cuda" else 0
    if gpus < 2:
        return {"result": "skipped", "size": "", "precision": "", "detail": f"{gpus} CUDA GPU(s); needs 2"}
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    out = work / "rf_nccl"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision", scale.precision,
           "-m", "distill_common.cli", "rf", "train-teacher", "--preset", "paper", *scale.rf_flags,
           "--train-steps", str(scale.steps), "--train-batch-size", str(scale.rf_batch),
           "--train-precision", scale.precision, "--train-checkpoint-every", str(scale.steps),
           "--data-source", "folder", "--data-root", str(cifar), "--no-track", "--output-dir", str(out)]
    env = {**os.environ, "NCCL_DEBUG": "WARN"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"two-process run exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    if not (out / "generator" / "generator.json").is_file():
        raise RuntimeError("two-process run wrote no generator")
    return {"size": f"2 processes x batch {scale.rf_batch // 2}", "precision": scale.precision,
            "detail": "NCCL, rank 0 wrote the generator"}


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="Tiny sizes on the CPU (fp32), same code paths.")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps per trainer (default 10; smoke 2).")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16", help="Trainers' mixed precision.")
    parser.add_argument("--workdir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        scale = smoke_scale(args.steps or 2)
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU visible; run with --cpu-smoke for the CPU version", file=sys.stderr)
            return 2
        scale = full_scale(args.precision, args.steps or 10)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="distill-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check()
    started = time.perf_counter()
    try:
        data: dict[str, Path] = {}
        check.run("synthetic data + random SD", lambda: prepare(scale, work, data))
        if data:
            if check.run("rf train-teacher (paper UNet)", lambda: rf_train(scale, work, data["cifar"])):
                check.run("rf sampling", lambda: rf_sampling(scale, work))
            check.run("prune train v3 (sd_small)", lambda: prune_train(scale, work, data["sd"], data["coco"]))
            if check.run("flash train (LoRA)", lambda: flash_train(scale, work, data["sd"], data["captions"])):
                check.run("SD sampling", lambda: sd_sampling(scale, work))
            check.run("2 processes (NCCL)", lambda: nccl_two_processes(scale, work, data["cifar"]))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    from rich.console import Console

    from distill_common.runtime import environment_info
    from distill_eval.reports import print_table

    env = environment_info(torch.device(scale.device))
    title = (f"distill GPU check ({scale.name}: {env.get('device_name', env['device'])}, torch {env['torch_version']}, "
             f"CUDA {env['cuda_version']}) in {time.perf_counter() - started:.0f} s")
    console = Console(width=max(180, shutil.get_terminal_size().columns))  # one row a line, also in CI logs
    print_table(check.rows, ["check", "result", "seconds", "size", "precision", "detail"], title=title, console=console)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
