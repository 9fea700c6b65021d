"""``distill flash eval``: the seed's ``eval_lora.sh`` as one call of the shared benchmark (distill_eval).

The baseline (base model, its own scheduler, 30 steps, CFG 7.5) is the benchmark's teacher and the LoRA student
(fused, LCM, guidance 0) its generator at 2/4/8 steps, at the same prompts and seeds: time/image, speed-up,
LPIPS to the baseline image of the same seed, optional FID/KID against COCO val2017, comparison grid, plots and
the distill_eval report. CLIPScore and quality retention (student CLIP / baseline CLIP) are added here and
written with the rest as ``flash_eval.{csv,json,md}``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_lora_flash.config import EvalConfig

BASELINE_LABEL = "baseline"
STUDENT_LABEL = "flash"
REPORT_COLUMNS = ("model", "steps", "ms_per_image", "speedup_vs_teacher", "clip_score", "quality_retention",
                  "lpips_to_teacher", "fid", "kid")


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    report_paths: dict[str, Path]
    benchmark: Any


def _fingerprint(cfg: EvalConfig, lora_file: Path) -> dict[str, Any]:
    """What the cached images depend on: a change discards them (the benchmark otherwise resumes from them)."""
    stat = lora_file.stat()
    digest = hashlib.sha256(f"{lora_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return {"base_model": cfg.base_model, "lora": digest, "lora_scale": cfg.lora_scale, "seed": cfg.seed,
            "prompt": cfg.prompt, "prompts_file": str(cfg.prompts_file), "coco_prompts": cfg.coco_prompts, "num_images": cfg.num_images,
            "guidance_scale": cfg.guidance_scale, "baseline_steps": cfg.baseline_steps,
            "baseline_guidance": cfg.baseline_guidance, "precision": cfg.precision, "device": cfg.device,
            "lcm_original_steps": cfg.lcm_original_steps, "steps": sorted(cfg.steps)}


def _reset_stale_images(out: Path, fingerprint: dict[str, Any]) -> None:
    marker = out / "eval_inputs.json"
    if marker.is_file() and json.loads(marker.read_text()) != fingerprint:
        shutil.rmtree(out / "images", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(fingerprint, indent=2))


def build_eval_generators(cfg: EvalConfig) -> tuple[Any, Any, Any]:
    """(baseline generator, student generator, LoRA source): two pipelines sharing the VAE and tokenizer."""
    from diffusers import StableDiffusionPipeline

    from distill_common.runtime import resolve_device, resolve_precision, torch_dtype
    from distill_lora_flash.generator import FlashGenerator
    from distill_lora_flash.loading import apply_lora, load_base_pipeline, resolve_lora_source
    from distill_lora_flash.schedule import FlashSchedule

    lora = resolve_lora_source(cfg.lora_path, cfg.lora_id)
    device = resolve_device(cfg.device)
    base = load_base_pipeline(cfg.base_model, device, torch_dtype(resolve_precision(cfg.precision, device, mixed=False)))
    parts = {**base.components, "unet": copy.deepcopy(base.unet), "text_encoder": copy.deepcopy(base.text_encoder)}
    if isinstance(base, StableDiffusionPipeline):
        student_pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    else:  # SDXL: both text encoders are copied (a LoRA may carry text-encoder layers)
        parts["text_encoder_2"] = copy.deepcopy(base.text_encoder_2)
        student_pipe = type(base)(**parts)
    student_pipe.set_progress_bar_config(disable=True)
    apply_lora(student_pipe, lora, scale=cfg.lora_scale, fuse=True)
    baseline = FlashGenerator(base, None, default_steps=cfg.baseline_steps, default_guidance=cfg.baseline_guidance,
                              label=BASELINE_LABEL)
    student = FlashGenerator(student_pipe, FlashSchedule.from_scheduler(base.scheduler, cfg.lcm_original_steps),
                             default_steps=min(cfg.steps), default_guidance=cfg.guidance_scale, label=STUDENT_LABEL)
    return baseline, student, lora


def run_eval(cfg: EvalConfig, tracking_run: Any = None, console: Any = None) -> EvalResult:
    """Run the benchmark for baseline vs student, then add CLIPScore / retention and write ``flash_eval.*``."""
    from rich.console import Console

    from distill_eval.benchmark import BenchmarkConfig, load_png_folder, run_benchmark
    from distill_eval.reports import print_table, write_report
    from distill_lora_flash.generation import clip_scorer

    console = console or Console()
    baseline, student, lora = build_eval_generators(cfg)
    out = Path(cfg.output_dir)
    _reset_stale_images(out, _fingerprint(cfg, lora.file))
    if cfg.prompt is not None:  # given to the benchmark verbatim ('# a cat' is a prompt, not a comment); kept on disk
        (out / "prompt.txt").write_text(cfg.prompt.strip() + "\n", encoding="utf-8")
    n = cfg.num_images * _num_prompts(cfg)
    bench_cfg = BenchmarkConfig(
        generators=[f"{STUDENT_LABEL}=student"], teacher=f"{BASELINE_LABEL}=baseline",
        teacher_steps=cfg.baseline_steps, steps=list(cfg.steps), num_images=n, seed=cfg.seed, guidance=None,
        reference=cfg.fid_reference if cfg.fid else "none", reference_n=cfg.reference_n,
        prompts_file=cfg.prompts_file, coco_prompts=0 if cfg.prompts_file or cfg.prompt else cfg.coco_prompts,
        prompts=[cfg.prompt.strip()] if cfg.prompt is not None else [],
        clip_model=None, lpips_net=cfg.lpips_net, batch_size=cfg.batch_size, timing_repeats=cfg.timing_repeats,
        grid_rows=cfg.grid_rows, output_dir=out, data_root=cfg.data_root, track=tracking_run is not None,
        device=cfg.device, feature_precision="fp32",  # this package's protocol (eval benchmark's default is bf16)
    )
    generators = {"baseline": baseline, "student": student}
    result = run_benchmark(bench_cfg, loader=generators.__getitem__, tracking_run=tracking_run, console=console)

    prompts = json.loads((out / "protocol_inputs.json").read_text())["conditions"]
    scorer = clip_scorer(cfg.clip_model, baseline.device, console)
    rows = [dict(r) for r in result.rows]
    base_clip = None
    for row in rows:
        row["guidance"] = cfg.baseline_guidance if row["role"] == "teacher" else cfg.guidance_scale
        row["clip_score"] = None
        if scorer is not None:
            images = load_png_folder(result.images[f"{row['model']}_s{row['steps']}"], n)
            conditions = _conditions(cfg, prompts, n)
            row["clip_score"] = float(scorer(images, conditions).mean())
            if row["role"] == "teacher":
                base_clip = row["clip_score"]
    for row in rows:
        row["quality_retention"] = row["clip_score"] / base_clip if row["clip_score"] is not None and base_clip else None
    meta = {"base_model": cfg.base_model, "lora": lora.label, "images": n, "prompts": repr(cfg.prompt) if cfg.prompt is not None else
            str(cfg.prompts_file or f"{cfg.coco_prompts} COCO val2017 captions"), "seeds": f"{cfg.seed}..{cfg.seed + n - 1}",
            "clip_model": cfg.clip_model if scorer is not None else "n/a", "protocol": result.protocol,
            "timing": f"batch {cfg.batch_size}, 1 warm-up + {cfg.timing_repeats} timed batches, device-synchronised"}
    report = write_report(rows, out, "flash_eval", columns=REPORT_COLUMNS, meta=meta)
    if tracking_run is not None:
        for row in rows:
            prefix = f"{row['model']}.s{row['steps']}"
            tracking_run.log_metrics({f"{prefix}.{k}": row[k] for k in ("clip_score", "quality_retention")
                                      if row.get(k) is not None})
        for path in report.values():
            tracking_run.log_artifact(path, "report")
    print_table(rows, [c for c in REPORT_COLUMNS if any(r.get(c) is not None for r in rows)],
                title="Flash LoRA evaluation", console=console)
    return EvalResult(rows, report, result)


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

