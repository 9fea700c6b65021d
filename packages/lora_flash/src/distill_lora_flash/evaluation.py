"""``distill flash eval``: the seed's ``eval_lora.sh`` as one call of the shared benchmark (distill_eval).

The baseline (base model, its own scheduler, 30 steps, CFG 7.5) is the benchmark's teacher; each LoRA student
(fused, LCM, guidance 0; several ``--lora-path LABEL=PATH`` make one table) and, with ``--control``, the base model
without a LoRA at the same LCM schedule and guidance are its generators at 2/4/8 steps, at the same prompts and
seeds: time/image, speed-up, LPIPS to the baseline image of the same seed, class accuracy when the prompts name
CIFAR-10 classes, optional FID/KID, comparison grid, plots and the distill_eval report. CLIPScore and the
retentions (student / baseline CLIPScore and class accuracy; student / baseline FID) are added here and written
with the rest as ``flash_eval.{csv,json,md}``.

Each generator's images are cached in their own folder under a key of what made them (base model, LoRA file
digest and scale, schedule, dtype, device, steps, guidance, seeds, prompts; see
:func:`distill_eval.benchmark.prepare_cache`): adding a LoRA reuses the baseline's images, changing one LoRA
regenerates only its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_lora_flash.config import (
    BASELINE_LABEL,
    CONTROL_LABEL,
    STUDENT_LABEL,
    EvalConfig,
    lora_path_list,
    lora_specs,
)

__all__ = ["BASELINE_LABEL", "CONTROL_LABEL", "STUDENT_LABEL", "REPORT_COLUMNS", "EvalModels", "EvalResult",
           "build_eval_generators", "run_eval"]
REPORT_COLUMNS = ("model", "steps", "ms_per_image", "speedup_vs_teacher", "clip_score", "quality_retention",
                  "class_accuracy", "class_accuracy_retention", "lpips_to_teacher", "fid", "fid_ratio", "kid")
STUDENT_DEFAULT_STEPS = 4  # unused by the benchmark (it passes --steps); fixed so that --steps keeps the cache keys


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    report_paths: dict[str, Path]
    benchmark: Any


@dataclass
class EvalModels:
    """The loaded generators: the baseline, then the students by label (the LoRAs in --lora-path order, then the
    control), and the LoRA file of each LoRA student."""

    baseline: Any
    students: dict[str, Any]
    loras: dict[str, Any]


def resolve_loras(cfg: EvalConfig) -> dict[str, Any]:
    """label -> LoraSource of each --lora-path (or the --lora-id adapter as 'flash'), resolved before any model load."""
    from distill_lora_flash.loading import resolve_lora_source

    specs = lora_specs(lora_path_list(cfg.lora_path))
    if not specs:
        return {STUDENT_LABEL: resolve_lora_source(None, cfg.lora_id)}
    return {label: resolve_lora_source(path, None) for label, path in specs}


def build_eval_generators(cfg: EvalConfig) -> EvalModels:
    """The baseline on the base pipeline; per LoRA a pipeline with its own UNet and text encoder copies (the LoRA
    fused in) sharing the VAE and tokenizer; the control a pipeline object over the base weights themselves."""
    from diffusers import StableDiffusionPipeline

    from distill_common.checkpoint import file_sha256
    from distill_common.runtime import resolve_device, resolve_precision, torch_dtype
    from distill_lora_flash.generator import FlashGenerator
    from distill_lora_flash.loading import apply_lora, load_base_pipeline
    from distill_lora_flash.schedule import FlashSchedule

    loras = resolve_loras(cfg)
    device = resolve_device(cfg.device)
    base = load_base_pipeline(cfg.base_model, device, torch_dtype(resolve_precision(cfg.precision, device, mixed=False)))
    # what made each model's images, beside the tensor digest the benchmark adds: the LoRA by its content (a moved
    # or renamed file keeps its images), the base model by name, the dtype and the device type
    made = {"base_model": str(cfg.base_model), "dtype": str(base.unet.dtype).replace("torch.", ""),
            "device": device.type}

    def pipeline(copy_weights: bool) -> Any:
        import copy

        parts = dict(base.components)
        names = ["unet", "text_encoder"] + (["text_encoder_2"] if "text_encoder_2" in parts else [])
        if copy_weights:  # SDXL: both text encoders (a LoRA may carry text-encoder layers)
            parts.update({name: copy.deepcopy(parts[name]) for name in names})
        pipe = (StableDiffusionPipeline(**parts, requires_safety_checker=False)
                if isinstance(base, StableDiffusionPipeline) else type(base)(**parts))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    schedule = FlashSchedule.from_scheduler(base.scheduler, cfg.lcm_original_steps)
    baseline = FlashGenerator(base, None, default_steps=cfg.baseline_steps, default_guidance=cfg.baseline_guidance,
                              label=BASELINE_LABEL, cache_info={**made, "lora_sha256": None})
    students: dict[str, Any] = {}
    for label, lora in loras.items():
        pipe = apply_lora(pipeline(copy_weights=True), lora, scale=cfg.lora_scale, fuse=True)
        students[label] = FlashGenerator(
            pipe, schedule, default_steps=STUDENT_DEFAULT_STEPS, default_guidance=cfg.guidance_scale, label=label,
            cache_info={**made, "lora_sha256": file_sha256(lora.file), "lora_scale": cfg.lora_scale})
    if cfg.control:
        students[CONTROL_LABEL] = FlashGenerator(pipeline(copy_weights=False), schedule,
                                                 default_steps=STUDENT_DEFAULT_STEPS,
                                                 default_guidance=cfg.guidance_scale, label=CONTROL_LABEL,
                                                 cache_info={**made, "lora_sha256": None})
    return EvalModels(baseline, students, loras)


def run_eval(cfg: EvalConfig, tracking_run: Any = None, console: Any = None) -> EvalResult:
    """Run the benchmark for the baseline vs every student, then add CLIPScore and the retentions and write
    ``flash_eval.*``. Every number comes from this run's benchmark rows, whose images each generator made."""
    from rich.console import Console

    from distill_eval.benchmark import BenchmarkConfig, load_png_folder, run_benchmark
    from distill_eval.reports import print_table, write_report
    from distill_lora_flash.generation import clip_scorer

    console = console or Console()
    models = build_eval_generators(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_inputs.json").unlink(missing_ok=True)  # the one-key-for-all marker of older versions
    if cfg.prompt is not None:  # given to the benchmark verbatim ('# a cat' is a prompt, not a comment); kept on disk
        (out / "prompt.txt").write_text(cfg.prompt.strip() + "\n", encoding="utf-8")
    n = cfg.num_images * _num_prompts(cfg)
    uris = {label: f"{label}:{models.loras[label].label}" if label in models.loras else f"{label}:{cfg.base_model}"
            for label in models.students}
    bench_cfg = BenchmarkConfig(
        generators=[f"{label}={uris[label]}" for label in models.students], teacher=f"{BASELINE_LABEL}=baseline",
        teacher_steps=cfg.baseline_steps, steps=list(cfg.steps), num_images=n, seed=cfg.seed, guidance=None,
        reference=cfg.fid_reference if cfg.fid else "none", reference_n=cfg.reference_n,
        prompts_file=cfg.prompts_file, coco_prompts=0 if cfg.prompts_file or cfg.prompt else cfg.coco_prompts,
        prompts=[cfg.prompt.strip()] if cfg.prompt is not None else [],
        clip_model=None, lpips_net=cfg.lpips_net, batch_size=cfg.batch_size, timing_repeats=cfg.timing_repeats,
        grid_rows=cfg.grid_rows, output_dir=out, data_root=cfg.data_root, track=tracking_run is not None,
        device=cfg.device, feature_precision=cfg.feature_precision,
    )
    generators = {"baseline": models.baseline, **{uris[label]: gen for label, gen in models.students.items()}}
    result = run_benchmark(bench_cfg, loader=generators.__getitem__, tracking_run=tracking_run, console=console)

    scorer = clip_scorer(cfg.clip_model, models.baseline.device, console)
    recorded = json.loads((out / "protocol_inputs.json").read_text())["conditions"]
    conditions = _conditions(cfg, recorded, n) if scorer is not None else []
    rows = [dict(r) for r in result.rows]
    for row in rows:
        row["guidance"] = cfg.baseline_guidance if row["role"] == "teacher" else cfg.guidance_scale
        if scorer is not None:
            images = load_png_folder(result.images[f"{row['model']}_s{row['steps']}"], n)
            row["clip_score"] = float(scorer(images, conditions).mean())
    add_retention(rows)
    meta = {"base_model": cfg.base_model,
            "lora": (next(iter(models.loras.values())).label if len(models.loras) == 1 else
                     ", ".join(f"{label}={lora.label}" for label, lora in models.loras.items())),
            "lora_scale": cfg.lora_scale,
            "control": (f"'{CONTROL_LABEL}': the base model without a LoRA, LCM, guidance {cfg.guidance_scale:g}"
                        if cfg.control else "off"),
            "images": n, "prompts": repr(cfg.prompt) if cfg.prompt is not None else
            str(cfg.prompts_file or f"{cfg.coco_prompts} COCO val2017 captions"), "seeds": f"{cfg.seed}..{cfg.seed + n - 1}",
            "clip_model": cfg.clip_model if scorer is not None else "n/a", "protocol": result.protocol,
            "feature_precision": cfg.feature_precision if cfg.fid else f"{cfg.feature_precision} (no FID computed)",
            "retention": "student / baseline at its own steps: quality_retention (CLIPScore), "
                         "class_accuracy_retention, fid_ratio (lower is better); 1.0 = 100% of the baseline",
            "timing": f"batch {cfg.batch_size}, 1 warm-up + {cfg.timing_repeats} timed batches, device-synchronised"}
    report = write_report(rows, out, "flash_eval", columns=REPORT_COLUMNS, meta=meta)
    if tracking_run is not None:
        for row in rows:
            prefix = f"{row['model']}.s{row['steps']}"
            tracking_run.log_metrics({f"{prefix}.{k}": row[k] for k in RETENTION_COLUMNS + ("clip_score",)
                                      if row.get(k) is not None})
        for path in report.values():
            tracking_run.log_artifact(path, "report")
    print_table(rows, [c for c in REPORT_COLUMNS if any(r.get(c) is not None for r in rows)],
                title="Flash LoRA evaluation", console=console)
    return EvalResult(rows, report, result)


RETENTION_COLUMNS = ("quality_retention", "class_accuracy_retention", "fid_ratio")
_RETAINED = {"quality_retention": "clip_score", "class_accuracy_retention": "class_accuracy", "fid_ratio": "fid"}


def add_retention(rows: list[dict[str, Any]]) -> None:
    """Each row's CLIPScore, class accuracy and FID as a fraction of the baseline's (the teacher row), in place; a
    column is added only where both numbers exist (and the baseline's is not 0)."""
    teacher = next((r for r in rows if r.get("role") == "teacher"), None)
    if teacher is None:
        return
    for column, metric in _RETAINED.items():
        base = teacher.get(metric)
        if not isinstance(base, (int, float)) or not base or base != base:
            continue
        for row in rows:
            value = row.get(metric)
            if isinstance(value, (int, float)) and value == value:
                row[column] = float(value) / float(base)


def _num_prompts(cfg: EvalConfig) -> int:
    if cfg.prompt is not None:
        return 1
    if cfg.prompts_file is not None:
        from distill_common.data.prompts import load_prompts_file

        return len(load_prompts_file(cfg.prompts_file))
    return cfg.coco_prompts


def _conditions(cfg: EvalConfig, recorded: list[str], n: int) -> list[str]:
    """The prompt of each of the n images (the benchmark cycles the prompt list)."""
    if cfg.prompt is not None:
        prompts = [cfg.prompt.strip()]
    elif cfg.prompts_file is not None:
        from distill_common.data.prompts import load_prompts_file

        prompts = load_prompts_file(cfg.prompts_file)
    else:
        from distill_common.data.prompts import coco_prompt_subset
        from distill_common.data.root import resolve_data_root

        prompts = coco_prompt_subset(resolve_data_root(cfg.data_root) / "coco2017", cfg.coco_prompts, seed=cfg.seed)
    conditions = [prompts[i % len(prompts)] for i in range(n)]
    assert conditions[: len(recorded)] == recorded[: len(conditions)], "prompts differ from the benchmark's"
    return conditions

