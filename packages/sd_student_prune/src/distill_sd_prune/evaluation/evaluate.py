"""``distill prune evaluate``: students against their teacher at equal seeds through the shared benchmark
(``distill_eval.benchmark``: FID on COCO val with its 95% bootstrap interval, the resize picked from the protocol
(bicubic for COCO photos), LPIPS to the teacher's image at the same seed, time per image),
plus the UNet's parameters and MACs per call and CLIPScore when a CLIP model is given, at the headline setting
(the first of ``--steps`` and ``--guidance``: 25 DDPM steps, CFG 5) and at the others. Registered students get
their headline numbers stamped (``eval.s{steps}.*``) and the per-budget champion aliases move."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_common.config import option
from distill_common.errors import ConfigError
from distill_common.runtime import DEVICES
from distill_eval.protocol import FEATURE_PRECISIONS
from distill_sd_prune.sampling.pipeline import SAMPLERS
from distill_sd_prune.training.config import DEFAULT_TEACHER


@dataclass
class EvaluateConfig:
    """Options of ``distill prune evaluate``."""

    generators: list[str] = option(
        [], "Students: generator folders, runs:/ID/PATH or models:/NAME@ALIAS (LABEL=URI names one)."
    )
    teacher_model: str = option(DEFAULT_TEACHER, "The teacher: hub id or local diffusers folder.")
    resolution: int | None = option(None, "Image resolution (default: the first student's).")
    steps: list[int] = option([25], "Sampler step counts; the first is the headline.")
    guidance: list[float] = option([5.0], "CFG scales; the first is the headline.")
    scheduler: str = option("ddpm", "Sampler for every model.", choices=tuple(SAMPLERS))
    num_images: int = option(64, "Images per (model, steps, guidance): seeded COCO val captions as prompts.")
    seed: int = option(0, "First seed (and prompt-subset seed).")
    reference: str = option("coco-val2017", "FID reference set.")
    reference_n: int | None = option(None, "Reference images used (default: all of the set).")
    feature_precision: str = option("fp32", "Inception forward precision: fp32 or bf16, +compile for torch.compile "
                                    "(part of the FID protocol).", choices=FEATURE_PRECISIONS)
    bootstrap_resamples: int = option(200, "Bootstrap resamples for each FID's 95% interval (0 = none).")
    clip_model: str | None = option(
        None, "CLIP model for CLIPScore: a hub id in the cache or a local folder."
    )
    lpips_net: str = option("alex", "LPIPS backbone.", choices=("alex", "vgg"))
    batch_size: int = option(8, "Generation and timing batch size.")
    timing_repeats: int = option(3, "Timed batches per configuration.")
    output_dir: Path = option(Path("runs/prune/evaluate"), "Images, reports, grids and plots go here.")
    data_root: Path | None = option(None, "Data root (default: $DISTILL_DATA_ROOT).")
    experiment: str = option("sd_student_prune-eval", "MLflow experiment of the evaluation run.")
    track: bool = option(True, "Log the evaluation to MLflow and stamp registered versions.")
    promote: bool = option(True, "Move champion-<budget> aliases of the registered model after stamping.")
    registered_name: str = option("sd_student_prune", "Registered model whose champions are promoted.")
    device: str = option("auto", "Device.", choices=DEVICES)

    def validate(self) -> None:
        if not self.generators:
            raise ConfigError("nothing to evaluate; pass --generators FOLDER_OR_URI [...]")
        if not self.steps or not self.guidance:
            raise ConfigError("pass at least one --steps and one --guidance value")
        if self.num_images < 2:
            raise ConfigError("FID needs at least 2 images; pass --num-images 2 or more")


def _label(spec: str) -> tuple[str, str]:
    from distill_eval.benchmark import parse_generator_spec

    return parse_generator_spec(spec)


def evaluate(cfg: EvaluateConfig, tracking_run: Any = None, console: Any = None) -> dict[str, Any]:
    """Run the evaluation; returns ``{"rows": [...], "report": paths, "champions": [...]}``."""
    from rich.console import Console

    from distill_common.generator import load_generator
    from distill_eval.benchmark import BenchmarkConfig, run_benchmark
    from distill_eval.reports import interval_note, mark_separability, write_report
    from distill_sd_prune.architecture.complexity import count_parameters, unet_macs
    from distill_sd_prune.sampling.generator import write_teacher_folder

    console = console or Console()
    out = Path(cfg.output_dir)
    loaded: dict[str, Any] = {}

    def loader(uri: str) -> Any:
        if uri not in loaded:
            loaded[uri] = load_generator(
                uri, device=cfg.device, scheduler=cfg.scheduler, batch_size=cfg.batch_size
            )
        return loaded[uri]

    students = [_label(spec) for spec in cfg.generators]
    resolution = cfg.resolution or int(loader(students[0][1]).resolution)
    teacher_dir = write_teacher_folder(out / "teacher_generator", cfg.teacher_model, resolution)
    for label, uri in students:
        if int(loader(uri).resolution) != resolution:
            raise ConfigError(
                f"{label} generates {loader(uri).resolution}px images but the evaluation runs at "
                f"{resolution}px; evaluate models of one resolution together"
            )
    complexity: dict[str, dict[str, Any]] = {}
    for label, uri in [("teacher", str(teacher_dir)), *students]:
        gen = loader(uri)
        latent = resolution // (2 ** (len(gen.pipe.vae.config.block_out_channels) - 1))
        macs = unet_macs(gen.unet.config, latent)
        complexity[label] = {
            "params": count_parameters(gen.unet),
            "gmacs": macs.total / 1e9,
            "gmacs_conv_linear": macs.conv_linear / 1e9,
            "budget": gen.info.get("budget", ""),
        }

    rows: list[dict[str, Any]] = []
    protocol = None
    for g_index, guidance in enumerate(cfg.guidance):
        bcfg = BenchmarkConfig(
            generators=[f"{label}={uri}" for label, uri in students],
            teacher=f"teacher={teacher_dir}",
            teacher_steps=cfg.steps[0],
            steps=list(cfg.steps),
            num_images=cfg.num_images,
            seed=cfg.seed,
            guidance=guidance,
            reference=cfg.reference,
            reference_n=cfg.reference_n,
            resize="auto",  # from the protocol: bicubic for COCO photos
            feature_precision=cfg.feature_precision,
            bootstrap_resamples=cfg.bootstrap_resamples,
            coco_prompts=cfg.num_images,
            clip_model=cfg.clip_model,
            lpips_net=cfg.lpips_net,
            batch_size=cfg.batch_size,
            timing_repeats=cfg.timing_repeats,
            output_dir=out / f"cfg{guidance:g}",
            data_root=cfg.data_root,
            track=tracking_run is not None,
            device=cfg.device,
        )
        headline = g_index == 0
        result = run_benchmark(
            bcfg, loader=loader, tracking_run=tracking_run if headline else None, console=console
        )
        protocol = result.protocol
        for row in result.rows:
            row.update(
                guidance=guidance,
                scheduler=cfg.scheduler,
                headline=headline and row["steps"] == cfg.steps[0],
                **complexity.get(row["model"], {}),
            )
            rows.append(row)
    columns = [
        "model",
        "budget",
        "steps",
        "guidance",
        "fid",
        "fid_ci95_low",
        "fid_ci95_high",
        "fid_vs_best",
        "kid",
        "kid_std",
        "lpips_to_teacher",
        "clip_score",
        "ms_per_image",
        "speedup_vs_teacher",
        "params",
        "gmacs",
        "gmacs_conv_linear",
        "headline",
    ]
    if protocol is not None:
        mark_separability(rows)
    meta = {
        "protocol": protocol,
        "intervals": interval_note(cfg.bootstrap_resamples if protocol is not None else 0),
        "scheduler": cfg.scheduler,
        "seeds": f"{cfg.seed}..{cfg.seed + cfg.num_images - 1}",
        "headline": f"{cfg.steps[0]} steps, CFG {cfg.guidance[0]:g}",
    }
    report = write_report(rows, out, "evaluation", columns=columns, meta=meta)
    champions = []
    if tracking_run is not None:
        _log(tracking_run, cfg, rows, students, report, protocol)
        registered = [uri for _, uri in students if uri.startswith(f"models:/{cfg.registered_name}")]
        if cfg.promote and registered:
            from distill_sd_prune.evaluation.champions import promote_per_budget

            champions = promote_per_budget(cfg.registered_name, steps=cfg.steps[0])
    return {"rows": rows, "report": report, "champions": champions}


def _log(
    run: Any,
    cfg: EvaluateConfig,
    rows: list[dict[str, Any]],
    students: list[tuple[str, str]],
    report: dict[str, Path],
    protocol: dict[str, Any] | None,
) -> None:
    import json

    from distill_common import tracking
    from distill_eval.benchmark import finite

    for row in rows:
        prefix = f"{row['model']}.s{row['steps']}.cfg{row['guidance']:g}"
        run.log_metrics(
            {
                f"{prefix}.{k}": float(v)
                for k, v in row.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("steps", "guidance")
            }
        )
    run.log_artifact(report["md"], "report")
    run.log_artifact(report["json"], "report")
    for label, uri in students:  # the benchmark stamped eval.s*.*; add the sampling setting and CLIPScore
        name, version = tracking.resolve_model_version(uri)
        if name is None:
            continue
        stamp: dict[str, Any] = {
            "eval.guidance": cfg.guidance[0],
            "eval.sampler": cfg.scheduler,
            "eval.run_id": run.run_id,
        }
        if protocol is not None:
            stamp["eval.protocol"] = json.dumps(protocol, sort_keys=True)
        for row in rows:
            if row["model"] == label and row["guidance"] == cfg.guidance[0]:
                for metric in ("fid", "fid_ci95_low", "fid_ci95_high", "kid", "clip_score", "params", "gmacs"):
                    if finite(row.get(metric)):
                        stamp[f"eval.s{row['steps']}.{metric}"] = row[metric]
        tracking.set_version_tags(name, version, {k: v for k, v in stamp.items() if v is not None})
