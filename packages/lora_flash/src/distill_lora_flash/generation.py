"""``distill flash generate``: Flash LoRA images at several LCM step counts, the optional CFG baseline, timing
(warm-up, then device-synchronised wall clock per batch), CLIPScore and the summary table.

File names are the seed demo's, exactly:
``image_s{steps}_i{idx}_seed{seed}.png``, ``grid_s{steps}_seed{seed}.png``,
``baseline/baseline_s{steps}_i{idx}_seed{seed}.png``, ``baseline/grid_baseline_s{steps}_seed{seed}.png`` and
``compare_baseline{B}_flash{F}_seed{seed}.png`` (baseline top row, Flash bottom row). Image ``idx`` runs over
all images (prompt-major); the k-th image of every prompt uses seed ``seed + k``. Without ``--seed`` (the seed
demo's default) a seed is drawn, printed and recorded in the summary, and the names carry no ``_seed{seed}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from distill_common.errors import DistillError
from distill_common.runtime import environment_info, timed
from distill_lora_flash.config import GenerateConfig

SUMMARY_COLUMNS = ("configuration", "steps", "guidance", "unet_calls", "unet_rows", "time_per_image_s", "speedup",
                   "clip_score", "quality_retention")


def _seed_suffix(seed: int | None) -> str:
    return f"_seed{seed}" if seed is not None else ""


def image_name(steps: int, idx: int, seed: int | None) -> str:
    return f"image_s{steps}_i{idx}{_seed_suffix(seed)}.png"


def grid_name(steps: int, seed: int | None) -> str:
    return f"grid_s{steps}{_seed_suffix(seed)}.png"


def baseline_image_name(steps: int, idx: int, seed: int | None) -> str:
    return f"baseline_s{steps}_i{idx}{_seed_suffix(seed)}.png"


def baseline_grid_name(steps: int, seed: int | None) -> str:
    return f"grid_baseline_s{steps}{_seed_suffix(seed)}.png"


def compare_name(baseline_steps: int, flash_steps: int, seed: int | None, student: str = "flash") -> str:
    return f"compare_baseline{baseline_steps}_{student}{flash_steps}{_seed_suffix(seed)}.png"


def draw_seed() -> int:
    """A fresh seed for runs without ``--seed`` (from the OS entropy pool, so it never repeats the last run's)."""
    import secrets

    return secrets.randbelow(2**31)


def resolve_seed(seed: int | None, console: Any) -> int:
    """``seed``, or a drawn one that is printed so the run can be repeated with ``--seed``."""
    if seed is not None:
        return int(seed)
    drawn = draw_seed()
    console.print(f"seed {drawn} (drawn: no --seed given; pass --seed {drawn} to repeat this run)", highlight=False)
    return drawn


def save_png(image: torch.Tensor, path: Path) -> Path:
    """(3, H, W) in [0, 1] -> PNG."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    from distill_common.checkpoint import save_image

    return save_image(Image.fromarray(arr), path)


@dataclass
class TimedImages:
    """Images of one configuration and their timing (seconds per image over the timed batches)."""

    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    batch_seconds: list[float]
    batch_sizes: list[int]
    warmup_seconds: float

    @property
    def seconds_per_image(self) -> float:
        return float(sum(self.batch_seconds) / max(1, sum(self.batch_sizes)))


def generate_timed(generator: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float | None,
                   batch_size: int, progress: Any = None, label: str = "", warmup_steps: int | None = None) -> TimedImages:
    """One untimed warm-up batch (same batch shape, ``warmup_steps``, default at most 2 steps), then every batch
    timed with device sync."""
    device = generator.device
    first = slice(0, min(batch_size, len(prompts)))
    with timed(device) as warm:
        generator.generate(list(prompts[first]), warmup_steps or min(steps, 2), list(seeds[first]), guidance)
    task = progress.add_task(label, total=len(prompts)) if progress is not None else None
    images, seconds, sizes = [], [], []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        with timed(device) as t:
            batch = generator.generate(list(prompts[start:stop]), steps, list(seeds[start:stop]), guidance)
        images.append(batch)
        seconds.append(t["seconds"])
        sizes.append(stop - start)
        if progress is not None:
            progress.advance(task, stop - start)
    return TimedImages(torch.cat(images), seconds, sizes, warm["seconds"])


def clip_scorer(model: str | None, device: torch.device | str, console: Any):
    """A ``distill_eval`` CLIPScorer, or None (column marked n/a) when the model is 'none' or cannot be loaded."""
    if not model or model.lower() == "none":
        console.print("[yellow]CLIPScore n/a:[/] no CLIP model (--clip-model none)")
        return None
    from distill_eval.clip_score import CLIPScorer

    try:
        return CLIPScorer.from_pretrained(model, device=device)
    except DistillError as exc:
        console.print(f"[yellow]CLIPScore n/a:[/] {exc}", highlight=False)
        return None


@dataclass
class GenerateResult:
    rows: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    report_paths: dict[str, Path] = field(default_factory=dict)


def prompt_list(cfg: GenerateConfig) -> list[str]:
    if cfg.prompts_file is not None:
        from distill_common.data.prompts import load_prompts_file

        return load_prompts_file(cfg.prompts_file)
    return [cfg.prompt]


def run_generate(cfg: GenerateConfig, console: Any = None) -> GenerateResult:
    """Everything ``distill flash generate`` does; returns the summary rows and the files written."""
    from rich.console import Console
    from rich.progress import Progress

    from distill_common.runtime import resolve_device, resolve_precision, torch_dtype
    from distill_eval.grids import image_grid
    from distill_eval.reports import print_table, write_report
    from distill_lora_flash.generator import FlashGenerator
    from distill_lora_flash.loading import apply_lora, load_base_pipeline, resolve_lora_source
    from distill_lora_flash.schedule import FlashSchedule

    console = console or Console()
    prompts = prompt_list(cfg)
    lora = resolve_lora_source(cfg.lora_path, cfg.lora_id)  # before the (large) base model: fail fast
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, mixed=False)
    pipe = load_base_pipeline(cfg.base_model, device, torch_dtype(precision))

    per_prompt = cfg.num_images
    seed = resolve_seed(cfg.seed, console)
    conditions = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + k for _ in prompts for k in range(per_prompt)]
    outdir = Path(cfg.outdir)
    baseline_dir = Path(cfg.baseline_outdir) if cfg.baseline_outdir is not None else outdir / "baseline"
    files: list[Path] = []
    results: list[tuple[str, int, float, Any, TimedImages]] = []  # (kind, steps, guidance, generator, images)

    with Progress(console=console, transient=True) as progress:
        baseline: TimedImages | None = None
        if cfg.compare_baseline:
            gen = FlashGenerator(pipe, None, default_steps=cfg.baseline_steps, default_guidance=cfg.baseline_guidance,
                                 label="baseline")
            baseline = generate_timed(gen, conditions, seeds, cfg.baseline_steps, cfg.baseline_guidance,
                                      cfg.batch_size, progress, f"baseline {cfg.baseline_steps} steps")
            for idx, img in enumerate(baseline.images):
                files.append(save_png(img, baseline_dir / baseline_image_name(cfg.baseline_steps, idx, cfg.seed)))
            files.append(_save_grid(image_grid(baseline.images, ncols=per_prompt),
                                    baseline_dir / baseline_grid_name(cfg.baseline_steps, cfg.seed)))
            results.append(("baseline", cfg.baseline_steps, cfg.baseline_guidance, gen, baseline))

        apply_lora(pipe, lora, scale=cfg.lora_scale, fuse=True)
        flash = FlashGenerator(pipe, FlashSchedule.from_scheduler(pipe.scheduler, cfg.lcm_original_steps),
                               default_guidance=cfg.guidance_scale)
        for steps in cfg.steps:
            run = generate_timed(flash, conditions, seeds, steps, cfg.guidance_scale, cfg.batch_size, progress,
                                 f"flash {steps} steps")
            for idx, img in enumerate(run.images):
                files.append(save_png(img, outdir / image_name(steps, idx, cfg.seed)))
            files.append(_save_grid(image_grid(run.images, ncols=per_prompt), outdir / grid_name(steps, cfg.seed)))
            if baseline is not None:
                pair = image_grid(torch.cat([baseline.images, run.images]), ncols=len(conditions))
                files.append(_save_grid(pair, outdir / compare_name(cfg.baseline_steps, steps, cfg.seed)))
            results.append(("flash", steps, cfg.guidance_scale, flash, run))

    scorer = clip_scorer(cfg.clip_model, device, console)
    rows = summary_rows(results, conditions, scorer)
    meta = {"base_model": cfg.base_model, "lora": lora.label, "prompts": len(prompts), "images_per_prompt": per_prompt,
            "seed": seed, "seed_drawn": cfg.seed is None,
            "seeds": f"{seed}..{seed + per_prompt - 1} per prompt", "precision": precision,
            "clip_model": cfg.clip_model if scorer is not None else "n/a",
            "timing": f"batch {cfg.batch_size}; 1 untimed warm-up batch, then every batch timed with device sync",
            **environment_info(device)}
    report = write_report(rows, outdir, "summary", columns=SUMMARY_COLUMNS, meta=meta)
    print_table(rows, SUMMARY_COLUMNS, title="Flash LoRA vs baseline", console=console)
    return GenerateResult(rows, files, report)


def _save_grid(grid: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def summary_rows(results: Sequence[tuple[str, int, float, Any, TimedImages]], conditions: Sequence[str],
                 scorer: Any) -> list[dict[str, Any]]:
    """Configuration, UNet evaluations, time/image, speed-up and CLIPScore retention vs the baseline (if run)."""
    rows: list[dict[str, Any]] = []
    base_time = base_clip = None
    for kind, steps, guidance, gen, run in results:
        calls, unet_rows = gen.unet_evaluations(steps, guidance)
        clip = float(scorer(run.images, list(conditions)).mean()) if scorer is not None else None
        sampler = type(gen.scheduler).__name__.removesuffix("Scheduler")
        label = f"{kind} ({sampler})"
        if kind == "baseline":
            base_time, base_clip = run.seconds_per_image, clip
        rows.append({"configuration": label, "steps": steps, "guidance": guidance, "unet_calls": calls,
                     "unet_rows": unet_rows, "time_per_image_s": run.seconds_per_image,
                     "warmup_s": run.warmup_seconds, "clip_score": clip})
    for row in rows:
        row["speedup"] = base_time / row["time_per_image_s"] if base_time else None
        row["quality_retention"] = (row["clip_score"] / base_clip
                                    if row["clip_score"] is not None and base_clip else None)
    return rows
