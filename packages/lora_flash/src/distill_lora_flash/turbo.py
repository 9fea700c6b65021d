"""``distill flash turbo``: few-step models distilled with adversarial diffusion distillation (Sauer et al. 2023,
"Adversarial Diffusion Distillation": SD-Turbo, SDXL-Turbo), text-to-image and image-to-image.

The model is loaded with diffusers' ``AutoPipelineForText2Image`` (which picks ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline`` from its ``model_index.json``) and keeps its own scheduler (Euler / Euler ancestral with
trailing spacing for the Turbo models); ``AutoPipelineForImage2Image.from_pipe`` shares the same weights for
image-to-image, where diffusers runs ``int(steps * strength)`` UNet steps from the noised start image. Files, timing
and the summary table are those of ``distill flash generate``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from distill_common.errors import ConfigError, DataError
from distill_lora_flash.config import TurboConfig, img2img_denoising_steps
from distill_lora_flash.generation import (
    GenerateResult,
    TimedImages,
    _save_grid,
    baseline_grid_name,
    baseline_image_name,
    clip_scorer,
    compare_name,
    generate_timed,
    grid_name,
    image_name,
    prompt_list,
    resolve_seed,
    save_png,
    summary_rows,
)
from distill_lora_flash.loading import image_resolution


def load_turbo_pipeline(model: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32):
    """The model's text-to-image pipeline through ``AutoPipelineForText2Image`` (hub id or local folder; a hub id that
    cannot be reached fails at once with the local-folder hint), safety checker off, progress bar off."""
    from diffusers import AutoPipelineForText2Image

    from distill_common.models.sd_loading import load_sd_pipeline

    return load_sd_pipeline(model, dtype=dtype, device=device, pipeline_cls=AutoPipelineForText2Image)


def image_to_image(pipe: Any):
    """The image-to-image pipeline of the same model, sharing ``pipe``'s modules (``AutoPipelineForImage2Image``)."""
    from diffusers import AutoPipelineForImage2Image
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # from_pipe re-announces the VAE's fp32 modules
    try:
        i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    finally:
        diffusers_logging.set_verbosity(level)
    i2i.set_progress_bar_config(disable=True)
    return i2i


def load_init_image(path: str | os.PathLike, size: int) -> Image.Image:
    """The start image as RGB, center-cropped to a square and resized to ``size`` x ``size`` (bicubic)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--init-image {file} does not exist; pass a local PNG or JPEG file")
    try:
        image = Image.open(file).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for unreadable files
        raise DataError(f"--init-image {file} is not a readable image ({type(exc).__name__}); pass a PNG or JPEG") from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


class TurboGenerator:
    """Prompts -> images (N, 3, H, W) in [0, 1] on the CPU with a few-step model and its own scheduler.

    With ``init_image`` it runs image-to-image at ``strength``. Each image has its own CPU ``torch.Generator`` seeded
    with its seed (start noise, VAE sampling and ancestral noise), so an image depends only on its prompt and seed.
    """

    condition_kind = "prompt"

    def __init__(self, pipe: Any, *, init_image: Image.Image | None = None, strength: float = 1.0,
                 default_steps: int = 1, default_guidance: float = 0.0, label: str = "turbo") -> None:
        self.pipe = image_to_image(pipe) if init_image is not None else pipe
        self.init_image = init_image
        self.strength = float(strength) if init_image is not None else 1.0
        self.scheduler = self.pipe.scheduler
        self.default_steps = int(default_steps)
        self.default_guidance = float(default_guidance)
        self.label = label
        self.resolution = init_image.width if init_image is not None else image_resolution(pipe)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def generate(self, conditions: Sequence[str], num_steps: int, seeds: Sequence[int],
                 guidance: float | None = None) -> torch.Tensor:
        if len(conditions) != len(seeds):
            raise ConfigError(f"got {len(conditions)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        if not conditions:
            return torch.empty(0, 3, self.resolution, self.resolution)
        if img2img_denoising_steps(num_steps, self.strength) < 1:
            raise ConfigError(f"{num_steps} steps at strength {self.strength:g} leave no denoising step; "
                              "diffusers needs steps x strength >= 1")
        scale = self.default_guidance if guidance is None else float(guidance)
        kwargs: dict[str, Any] = {"prompt": [str(c) for c in conditions], "num_inference_steps": int(num_steps),
                                  "guidance_scale": scale, "output_type": "pt",
                                  "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]}
        if self.init_image is not None:
            kwargs.update(image=[self.init_image] * len(conditions), strength=self.strength)
        else:
            kwargs.update(height=self.resolution, width=self.resolution)
        with torch.inference_mode():
            out = self.pipe(**kwargs)
        return out.images.float().clamp(0, 1).cpu()

    def unet_evaluations(self, num_steps: int, guidance: float | None = None) -> tuple[int, int]:
        """(UNet calls, UNet batch rows) per image; image-to-image runs ``int(steps * strength)`` calls."""
        scale = self.default_guidance if guidance is None else float(guidance)
        calls = img2img_denoising_steps(int(num_steps), self.strength)
        return calls, calls * (2 if scale > 1.0 else 1)


def _warmup_steps(steps: int, strength: float) -> int:
    """The fewest steps (at most ``steps``, at most 2 when possible) that still give image-to-image a denoising step."""
    for n in range(1, steps + 1):
        if n >= min(steps, 2) and img2img_denoising_steps(n, strength) >= 1:
            return n
    return steps


def run_turbo(cfg: TurboConfig, console: Any = None) -> GenerateResult:
    """Everything ``distill flash turbo`` does; returns the summary rows and the files written."""
    from rich.console import Console
    from rich.progress import Progress

    from distill_common.runtime import environment_info, resolve_device, resolve_precision, torch_dtype
    from distill_eval.grids import image_grid
    from distill_eval.reports import print_table, write_report
    from distill_lora_flash.generation import SUMMARY_COLUMNS

    console = console or Console()
    prompts = prompt_list(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, mixed=False)
    dtype = torch_dtype(precision)
    pipe = load_turbo_pipeline(cfg.model, device, dtype)
    init = load_init_image(cfg.init_image, image_resolution(pipe)) if cfg.init_image is not None else None
    mode = "img2img" if init is not None else "text2img"
    kind = f"turbo {mode}"

    per_prompt = cfg.num_images
    seed = resolve_seed(cfg.seed, console)
    conditions = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + k for _ in prompts for k in range(per_prompt)]
    outdir = Path(cfg.outdir)
    baseline_dir = Path(cfg.baseline_outdir) if cfg.baseline_outdir is not None else outdir / "baseline"
    files: list[Path] = []
    results: list[tuple[str, int, float, Any, TimedImages]] = []

    with Progress(console=console, transient=True) as progress:
        baseline: TimedImages | None = None
        if cfg.compare_baseline:
            base_pipe = pipe if cfg.baseline_model in (None, "", cfg.model) else load_turbo_pipeline(
                cfg.baseline_model, device, dtype)
            base_init = init.resize((image_resolution(base_pipe),) * 2, Image.Resampling.BICUBIC) if init else None
            gen = TurboGenerator(base_pipe, init_image=base_init, strength=cfg.strength,
                                 default_steps=cfg.baseline_steps, default_guidance=cfg.baseline_guidance,
                                 label="baseline")
            baseline = generate_timed(gen, conditions, seeds, cfg.baseline_steps, cfg.baseline_guidance,
                                      cfg.batch_size, progress, f"baseline {cfg.baseline_steps} steps",
                                      warmup_steps=_warmup_steps(cfg.baseline_steps, gen.strength))
            for idx, img in enumerate(baseline.images):
                files.append(save_png(img, baseline_dir / baseline_image_name(cfg.baseline_steps, idx, cfg.seed)))
            files.append(_save_grid(image_grid(baseline.images, ncols=per_prompt),
                                    baseline_dir / baseline_grid_name(cfg.baseline_steps, cfg.seed)))
            results.append(("baseline", cfg.baseline_steps, cfg.baseline_guidance, gen, baseline))

        turbo = TurboGenerator(pipe, init_image=init, strength=cfg.strength, default_steps=min(cfg.step_counts),
                               default_guidance=cfg.guidance_scale)
        for steps in cfg.step_counts:
            run = generate_timed(turbo, conditions, seeds, steps, cfg.guidance_scale, cfg.batch_size, progress,
                                 f"{kind} {steps} steps", warmup_steps=_warmup_steps(steps, turbo.strength))
            for idx, img in enumerate(run.images):
                files.append(save_png(img, outdir / image_name(steps, idx, cfg.seed)))
            files.append(_save_grid(image_grid(run.images, ncols=per_prompt), outdir / grid_name(steps, cfg.seed)))
            if baseline is not None and baseline.images.shape[-2:] == run.images.shape[-2:]:
                pair = image_grid(torch.cat([baseline.images, run.images]), ncols=len(conditions))
                files.append(_save_grid(pair, outdir / compare_name(cfg.baseline_steps, steps, cfg.seed, "turbo")))
            results.append((kind, steps, cfg.guidance_scale, turbo, run))

    scorer = clip_scorer(cfg.clip_model, device, console)
    rows = summary_rows(results, conditions, scorer)
    meta = {"model": cfg.model, "pipeline": type(turbo.pipe).__name__, "mode": mode,
            "init_image": str(cfg.init_image) if init is not None else None,
            "strength": cfg.strength if init is not None else None,
            "baseline_model": (cfg.baseline_model or cfg.model) if cfg.compare_baseline else None,
            "prompts": len(prompts), "images_per_prompt": per_prompt, "seed": seed, "seed_drawn": cfg.seed is None,
            "seeds": f"{seed}..{seed + per_prompt - 1} per prompt", "precision": precision,
            "clip_model": cfg.clip_model if scorer is not None else "n/a",
            "timing": f"batch {cfg.batch_size}; 1 untimed warm-up batch, then every batch timed with device sync",
            **environment_info(device)}
    report = write_report(rows, outdir, "summary", columns=SUMMARY_COLUMNS, meta=meta)
    print_table(rows, SUMMARY_COLUMNS, title=f"{type(turbo.pipe).__name__} ({mode})", console=console)
    return GenerateResult(rows, files, report)
