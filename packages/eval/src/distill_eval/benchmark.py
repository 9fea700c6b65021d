"""The shared benchmark: teacher and students at equal seeds, steps and metric protocol.

For every (generator, step count) the benchmark generates the same conditions with the same seeds,
then measures FID/KID against a reference set, LPIPS to the teacher's image at the same seed,
CLIPScore for prompt generators (when a CLIP model is available) and latency. Generated images are
kept as PNG files, so a cut-off benchmark resumes without regenerating finished images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress

from distill_common.config import option
from distill_common.errors import ConfigError, DistillError, check_finite_images
from distill_eval.classifier import class_accuracy
from distill_eval.protocol import DEFAULT_PROTOCOL, FEATURE_PRECISIONS

STAMPED = ("fid", "fid_ci95_low", "fid_ci95_high", "kid", "kid_std", "lpips_to_teacher", "clip_score",
           "class_accuracy", "ms_per_image")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class BenchmarkConfig:
    """Options of ``distill eval benchmark``."""

    generators: list[str] = option([], "Generators to evaluate: models:/NAME@ALIAS, runs:/ID/PATH or a local "
                                   "folder; prefix LABEL= to name one (e.g. student=models:/rf_cifar@champion).")
    teacher: str | None = option("reference", "The teacher generator (same forms; default: the shipped CIFAR-10 "
                                 "teacher; 'none' for no teacher); LPIPS to teacher and speed-ups use it.")
    teacher_steps: int | None = option(None, "Teacher step count (default: the teacher's default_steps).", ge=1)
    steps: list[int] = option([1, 2, 4], "Student step counts to evaluate.", ge=1)
    num_images: int = option(DEFAULT_PROTOCOL["generated_n"], "Generated images per (generator, steps); the seeds are seed..seed+N-1.", ge=1)
    seed: int = option(0, "First seed.")
    guidance: float | None = option(None, "Guidance scale (default: each generator's own).", ge=0)
    reference: str = option(DEFAULT_PROTOCOL["reference_set"], "FID reference set: cifar10-train, cifar10-test, coco-val2017, an "
                            "image folder, or none.")
    reference_n: int | None = option(DEFAULT_PROTOCOL["reference_n"], "Reference images used (none: all of the "
                                     "set).", ge=2)
    resize: str = option("auto", "How images reach the Inception input: auto (from the reference set: none for "
                         "32 px CIFAR-10, bicubic for COCO and folders), none (torch-fidelity's own resize; square "
                         "sets only) or an antialiased bilinear/bicubic resize.",
                         choices=("auto", "none", "bilinear", "bicubic"))
    feature_precision: str = option(DEFAULT_PROTOCOL["feature_precision"], "Inception forward precision: bf16 "
                                    "(about 2x faster on CPUs with bf16 units) or fp32; part of the protocol, never "
                                    "ranked against each other; +compile: under torch.compile, 1.34x.",
                                    choices=FEATURE_PRECISIONS)
    bootstrap_resamples: int = option(200, "Bootstrap resamples of the generated images for each FID's 95% "
                                      "interval (FID ± 1.96 bootstrap SE, seeded by --seed; 0 = no interval).", ge=0)
    prompts_file: Path | None = option(None, "Prompts for prompt generators (one a line).")
    prompts: list[str] = option([], "Prompts given directly (by a command's --prompt; taken verbatim, e.g. a "
                                "prompt starting with '#').", cli=False)
    coco_prompts: int = option(0, "Use N seeded COCO val captions as prompts instead of a file (0 = off).", ge=0)
    clip_model: str | None = option(None, "CLIP model for CLIPScore: a hub id or a local folder.")
    class_accuracy: bool = option(True, "Class accuracy by the shipped CIFAR-10 classifier: the share of images "
                                  "classified as their class label, or as the CIFAR-10 class their prompt names "
                                  "(skipped when a prompt names none).")
    lpips_net: str = option("alex", "LPIPS backbone.", choices=("alex", "vgg"))
    batch_size: int = option(32, "Generation and timing batch size.", ge=1)
    timing_repeats: int = option(3, "Timed batches per configuration (after one warm-up batch).", ge=1)
    grid_rows: int = option(8, "Rows (conditions) in the comparison grid.", ge=1)
    output_dir: Path = option(Path("runs/eval/benchmark"), "Where images, reports, grids and plots go.")
    data_root: Path | None = option(None, "Data root (default: $DISTILL_DATA_ROOT).")
    experiment: str = option("eval", "MLflow experiment of the evaluation run.")
    track: bool = option(True, "Log the evaluation run to MLflow.")
    device: str = option("auto", "Device.", choices=("auto", "cuda", "mps", "cpu"))

    def validate(self) -> None:
        if self.teacher in ("", "none"):
            self.teacher = None
        if not self.generators and not self.teacher:
            raise ConfigError("nothing to evaluate; pass --generators (and usually --teacher)")
        if self.num_images < 1:
            raise ConfigError("--num-images must be at least 1")
        if self.bootstrap_resamples < 0 or self.bootstrap_resamples == 1:
            raise ConfigError(f"--bootstrap-resamples must be 0 (no interval) or at least 2, got "
                              f"{self.bootstrap_resamples}; pass e.g. 200")
        for spec in [*self.generators, *([self.teacher] if self.teacher else [])]:
            _check_label(parse_generator_spec(spec)[0], spec)


@dataclass
class BenchmarkResult:
    rows: list[dict[str, Any]]
    report_paths: dict[str, Path]
    grid_path: Path | None
    plot_paths: list[Path]
    protocol: dict[str, Any] | None
    run_id: str | None = None
    images: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ helpers


def _check_label(label: str, spec: str) -> None:
    """A label names folders under the output folder: no path separators, no '..', nothing empty."""
    if not label or label in (".", "..") or any(ch in label for ch in "/\\\0") or label.startswith("."):
        raise ConfigError(f"generator label {label!r} (in {spec!r}) is not a plain name; labels name folders under "
                          "--output-dir: pass LABEL=URI with a label of letters, digits, '-' or '_'")


def parse_generator_spec(spec: str) -> tuple[str, str]:
    """``label=uri`` → (label, uri); a bare URI gets a label from its last path part."""
    if "=" in spec and not spec.startswith(("models:/", "runs:/")):
        label, uri = spec.split("=", 1)
        return label, uri
    tail = spec.rstrip("/").split("/")[-1].replace("@", "-")
    return tail or spec, spec


def conditions_for(generator: Any, n: int, prompts: Sequence[str] | None) -> list[Any]:
    """Class labels cycle 0..9 (equal classes); prompts cycle through the prompt list."""
    if generator.condition_kind == "class":
        num_classes = int(getattr(generator, "num_classes", 10))
        return [i % num_classes for i in range(n)]
    if not prompts:
        raise ConfigError("a prompt generator needs prompts; pass --prompts-file or --coco-prompts N")
    return [prompts[i % len(prompts)] for i in range(n)]


def condition_label(c: Any) -> str:
    if isinstance(c, int) and 0 <= c < len(CIFAR10_CLASSES):
        return CIFAR10_CLASSES[c]
    return str(c)


def _save_png(img: torch.Tensor, path: Path) -> None:
    arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    from distill_common.checkpoint import save_image

    save_image(Image.fromarray(arr), path)


def load_png_folder(folder: Path, n: int) -> torch.Tensor:
    """(n, 3, H, W) float in [0, 1] from ``00000.png`` … in index order."""
    arrs = [np.array(Image.open(folder / f"{i:05d}.png").convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


CACHE_KEY_FILE = "cache_key.json"


def _tensor_digest(modules: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _modules_of(generator: Any) -> list[Any]:
    """The torch modules holding a generator's weights: its attributes, and a diffusers pipeline's components."""
    found: list[Any] = []
    for value in vars(generator).values():
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif hasattr(value, "components") and isinstance(getattr(value, "components", None), dict):
            found += [m for _, m in sorted(value.components.items()) if isinstance(m, torch.nn.Module)]
    return found


def generator_fingerprint(generator: Any) -> str:
    """sha256 identifying a loaded generator's weights and settings: its tensors (every nn.Module it holds, a
    pipeline's components included) and its plain settings (default guidance, sampler, scheduler, precision, info).
    A generator may define ``fingerprint()`` itself. One whose class sets ``installs_own_scheduler = True`` puts its
    own ``scheduler`` on its pipeline before each sampling, so the pipeline's current scheduler (whichever generator
    sampled last) is left out: its key stays the same whatever ran before it."""
    own = getattr(generator, "fingerprint", None)
    if callable(own):
        return str(own())
    digest = hashlib.sha256(f"{type(generator).__module__}.{type(generator).__qualname__}".encode())
    plain = {k: v for k, v in sorted(vars(generator).items())
             if isinstance(v, (str, int, float, bool, type(None), list, tuple, dict))
             and k not in ("last_nfe", "batch_size")}
    plain.update({k: dataclasses.asdict(v) for k, v in vars(generator).items()
                  if dataclasses.is_dataclass(v) and not isinstance(v, type)})  # e.g. a sampling schedule's options
    digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
    attrs = ("scheduler",) if getattr(generator, "installs_own_scheduler", False) else ("scheduler", "pipe")
    for attr in attrs:  # the scheduler options (class and config) decide the images too
        sched = getattr(generator, attr, None)
        sched = getattr(sched, "scheduler", sched) if attr == "pipe" else sched
        if sched is not None and hasattr(sched, "config"):
            digest.update(f"{type(sched).__name__}:{json.dumps(dict(sched.config), sort_keys=True, default=str)}".encode())
    digest.update(_tensor_digest(_modules_of(generator)).encode())
    return digest.hexdigest()


def image_cache_key(generator: Any, num_steps: int, *, seed: int, condition_rule: str, guidance: float | None,
                    extra: dict[str, Any] | None = None, fingerprint: str | None = None) -> dict[str, Any]:
    """Everything that decides a cached image: the weights and settings (fingerprint), the seeds (image i has seed
    ``seed + i``), the conditions, the steps, the guidance, the sampler and the precision; ``extra`` adds (or
    sets) named items: the benchmark passes a generator's ``cache_info`` dict (e.g. a LoRA file's digest), so that
    a cache note names what changed."""
    return {"weights": fingerprint or generator_fingerprint(generator), "seed": int(seed), "conditions": condition_rule,
            "steps": int(num_steps), "guidance": guidance, "sampler": getattr(generator, "sampler", None),
            "precision": getattr(generator, "precision", None), "resolution": getattr(generator, "resolution", None),
            **(extra or {})}


def prepare_cache(folder: Path, key: dict[str, Any], *, label: str, note: Callable[[str], None] | None = None) -> int:
    """Make ``folder`` hold only images made under ``key``: PNGs cached under another key (or none) are deleted, and
    the key is written before any new image. Returns how many images are reused (and says so)."""
    from distill_common.checkpoint import write_json

    folder.mkdir(parents=True, exist_ok=True)
    say = note or (lambda msg: print(f"note: {msg}"))
    pngs = sorted(folder.glob("[0-9][0-9][0-9][0-9][0-9].png"))
    path = folder / CACHE_KEY_FILE
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        old = None
    if old == key:
        if pngs:
            say(f"{label}: reusing {len(pngs)} cached image(s) in {folder} (same weights, seeds, conditions, steps, "
                "guidance, sampler and precision)")
        return len(pngs)
    if pngs:
        changed = sorted(k for k in set(key) | set(old or {}) if (old or {}).get(k) != key.get(k))
        why = f"{', '.join(changed)} changed" if old else "they carry no cache key"
        say(f"{label}: {len(pngs)} cached image(s) in {folder} were made with other settings ({why}); regenerating")
        for png in pngs:
            png.unlink()
    write_json(path, key)
    return 0


FEATURE_CACHE_FILE = "inception_features.safetensors"


def cached_features(folder: Path, n: int, extractor: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Inception features of the first ``n`` images of a cached image folder, stored beside them.

    The entry is keyed by the folder's own image cache key (weights, seeds, conditions, steps, guidance, sampler,
    precision), ``n`` and the extractor (weights hash, forward precision, resize), so a re-scored folder skips the
    Inception pass (about 100 s per 2,000 images on two CPU cores) and anything that changed the images or the
    features recomputes them. A missing, garbled or differently keyed file is recomputed and replaced atomically."""
    from safetensors import safe_open

    from distill_common.checkpoint import save_weights

    image_key_path = folder / CACHE_KEY_FILE
    if not image_key_path.is_file():  # a folder without a key has no provenance to cache under
        return compute()
    key = json.dumps({"images": json.loads(image_key_path.read_text()), "n": int(n),
                      "extractor": extractor.extractor_hash, "precision": getattr(extractor, "precision", "fp32"),
                      "resize": getattr(extractor, "resize", "none")}, sort_keys=True, default=str)
    path = folder / FEATURE_CACHE_FILE
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("features")
        except Exception:  # noqa: BLE001 - a garbled file is recomputed, never trusted
            pass
    features = compute()
    save_weights({"features": features}, path, metadata={"key": key})
    return features


def generate_to_folder(
    generator: Any,
    num_steps: int,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    folder: Path,
    *,
    guidance: float | None,
    batch_size: int,
    progress: Progress | None = None,
    description: str = "",
) -> int:
    """Generate the images whose PNG is missing (resume); returns how many were generated now. The caller keys the
    folder first (:func:`prepare_cache`), so that a PNG found here was made by this generator at these settings."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(conditions)) if not (folder / f"{i:05d}.png").is_file()]
    task = progress.add_task(description, total=len(conditions), completed=len(conditions) - len(todo)) if progress else None
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        with torch.inference_mode():
            images = generator.generate([conditions[i] for i in idx], num_steps, [seeds[i] for i in idx], guidance)
        check_finite_images(images, f"{description or 'generation'} (seeds {seeds[idx[0]]}..{seeds[idx[-1]]})")
        for i, img in zip(idx, images, strict=True):
            _save_png(img, folder / f"{i:05d}.png")
        if progress is not None:
            progress.advance(task, len(idx))
    return len(todo)


# ------------------------------------------------------------------------------------------ benchmark


@dataclass
class _Config:
    label: str
    uri: str
    generator: Any
    steps: int
    is_teacher: bool
    version: tuple[str | None, str | None] = (None, None)  # the registry version loaded (pinned before the load)

    @property
    def key(self) -> str:
        return f"{self.label}_s{self.steps}"


def run_benchmark(
    cfg: BenchmarkConfig,
    *,
    loader: Callable[[str], Any] | None = None,
    tracking_run: Any = None,
    console: Any = None,
) -> BenchmarkResult:
    """Evaluate every generator at every step count against the reference set and the teacher."""
    from rich.console import Console

    from distill_common.generator import load_generator
    from distill_eval.grids import comparison_grid
    from distill_eval.plots import plot_quality_vs_latency, plot_quality_vs_steps
    from distill_eval.reports import interval_note, mark_separability, write_report
    from distill_eval.timing import time_generator

    console = console or Console()
    load = loader or (lambda uri: load_generator(uri, device=cfg.device))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def pin(uri: str) -> tuple[str | None, str | None]:
        """The registry version an alias names now, read before the load: its tags get only its own numbers."""
        if tracking_run is None or not uri.startswith("models:/"):
            return None, None
        from distill_common import tracking

        return tracking.resolve_model_version(uri)

    configs: list[_Config] = []
    teacher_cfg: _Config | None = None
    if cfg.teacher:
        label, uri = parse_generator_spec(cfg.teacher)
        label = label if "=" in cfg.teacher else "teacher"
        version = pin(uri)
        gen = load(uri)
        teacher_cfg = _Config(label, uri, gen, cfg.teacher_steps or int(gen.default_steps), True, version)
        configs.append(teacher_cfg)
    for spec in cfg.generators:
        label, uri = parse_generator_spec(spec)
        _check_label(label, spec)
        version = pin(uri)
        gen = load(uri)
        for s in cfg.steps:
            configs.append(_Config(label, uri, gen, int(s), False, version))
    kinds = {c.generator.condition_kind for c in configs}
    if len(kinds) > 1:
        if cfg.teacher == "reference":
            raise ConfigError("the default --teacher 'reference' is the CIFAR-10 class teacher and these generators "
                              "take prompts; pass --teacher with their own teacher, or --teacher none")
        raise ConfigError(f"generators mix condition kinds {sorted(kinds)}; benchmark class and prompt models separately")

    prompts = _prompts(cfg) if "prompt" in kinds else None
    conditions = conditions_for(configs[0].generator, cfg.num_images, prompts)
    seeds = [cfg.seed + i for i in range(cfg.num_images)]
    (out / "protocol_inputs.json").write_text(json.dumps({"seeds": [seeds[0], seeds[-1]], "conditions": conditions[:50]}, default=str))

    # 1. images (resumable; each folder keyed by what made its images, so a changed model or setting regenerates)
    rule = _condition_rule(configs[0].generator, prompts)
    fingerprints: dict[int, str] = {}  # one hash per loaded generator, shared by its step counts
    image_dirs: dict[str, Path] = {}
    with Progress(console=console, transient=False) as progress:
        for c in configs:
            folder = out / "images" / c.key
            image_dirs[c.key] = folder
            if id(c.generator) not in fingerprints:  # hashing a pipeline's weights takes seconds: once each
                fingerprints[id(c.generator)] = generator_fingerprint(c.generator)
            fp = fingerprints[id(c.generator)]
            info = getattr(c.generator, "cache_info", None)  # a generator's named provenance, e.g. its LoRA digest
            key = image_cache_key(c.generator, c.steps, seed=cfg.seed, condition_rule=rule, guidance=cfg.guidance,
                                  fingerprint=fp, extra=info if isinstance(info, dict) else None)
            prepare_cache(folder, key, label=c.key,
                          note=lambda msg: console.print(f"[yellow]note:[/] {msg}", highlight=False))
            generate_to_folder(c.generator, c.steps, conditions, seeds, folder, guidance=cfg.guidance,
                               batch_size=cfg.batch_size, progress=progress, description=f"generate {c.key}")

    # 2. metrics
    rows: list[dict[str, Any]] = []
    fid_eval = _FidEvaluator(cfg, int(configs[0].generator.resolution)) if cfg.reference != "none" else None
    lpips = _lpips(cfg.lpips_net) if teacher_cfg is not None else None
    clip = _clip(cfg.clip_model, console) if "prompt" in kinds else None
    intended = intended_classes(conditions) if cfg.class_accuracy else None
    judge = _class_judge(console) if intended is not None else None
    teacher_images = load_png_folder(image_dirs[teacher_cfg.key], cfg.num_images) if teacher_cfg else None
    teacher_ms = None
    for c in configs:
        # the teacher's folder is read once: its images are already in memory for LPIPS
        images = teacher_images if c is teacher_cfg and teacher_images is not None else \
            load_png_folder(image_dirs[c.key], cfg.num_images)
        row: dict[str, Any] = {"model": c.label, "role": "teacher" if c.is_teacher else "student", "steps": c.steps,
                               "uri": c.uri, "num_images": cfg.num_images}
        timing = time_generator(c.generator, c.steps, conditions=conditions[: cfg.batch_size],
                                seeds=seeds[: cfg.batch_size], guidance=cfg.guidance, repeats=cfg.timing_repeats)
        row.update({"ms_per_image": timing.ms_per_image, "image_p95_ms": timing.image_p95_ms,
                    "images_per_second": timing.images_per_second, "peak_memory_mb": timing.peak_memory_mb})
        row.update({f"stage_{k}_ms": v * 1000 for k, v in timing.stages.items()})
        if c.is_teacher:
            teacher_ms = timing.ms_per_image
        if fid_eval is not None:
            row.update(fid_row(fid_eval(images, image_dirs[c.key])))
        if lpips is not None and teacher_images is not None:
            row["lpips_to_teacher"] = 0.0 if c.is_teacher else float(_batched(lpips, images, teacher_images, cfg.batch_size))
        if clip is not None:
            row["clip_score"] = float(clip(images, conditions))
        if judge is not None:
            acc = class_accuracy((images * 255).round().to(torch.uint8), intended, judge)  # images in [0, 1]
            row.update(class_accuracy=acc.accuracy, class_accuracy_low=acc.low, class_accuracy_high=acc.high)
        rows.append(row)
    for row in rows:
        row["speedup_vs_teacher"] = (teacher_ms / row["ms_per_image"]) if teacher_ms else None
    if fid_eval is not None:
        mark_separability(rows)

    protocol = fid_eval.protocol_dict(cfg.num_images) if fid_eval is not None else None
    meta = {"protocol": protocol, "seeds": f"{seeds[0]}..{seeds[-1]}", "guidance": cfg.guidance,
            **({"intervals": interval_note(cfg.bootstrap_resamples)} if fid_eval is not None else {}),
            "timing": f"batch {cfg.batch_size}, 1 warm-up + {cfg.timing_repeats} timed batches, device-synchronised",
            "environment": timing.environment if configs else {}}
    columns = ["model", "role", "steps", "fid", "fid_ci95_low", "fid_ci95_high", "fid_vs_best", "fid_vs_teacher",
               "kid", "kid_std", "lpips_to_teacher", "clip_score", "class_accuracy", "class_accuracy_low",
               "class_accuracy_high", "ms_per_image", "speedup_vs_teacher",
               "images_per_second", "peak_memory_mb"]
    report = write_report(rows, out, "benchmark", columns=columns, meta=meta)

    # 3. pictures
    n_rows = min(cfg.grid_rows, cfg.num_images)
    grid_idx = _grid_indices(conditions, n_rows)
    grid_cols = []
    for c, row in zip(configs, rows, strict=True):
        imgs = torch.stack([_load_one(image_dirs[c.key], i) for i in grid_idx])
        grid_cols.append((f"{c.label} · {c.steps} steps · {row['ms_per_image']:.1f} ms/img", imgs))
    grid_path = out / "grid.png"
    comparison_grid(grid_cols, [condition_label(conditions[i]) for i in grid_idx], grid_path,
                    title=f"seeds {', '.join(str(seeds[i]) for i in grid_idx)}")
    plot_paths = []
    metric = "fid" if fid_eval is not None else ("clip_score" if clip is not None else "lpips_to_teacher")
    if any(r.get(metric) is not None for r in rows):
        plot_paths.append(plot_quality_vs_steps(rows, metric, out / "plots" / f"{metric}_vs_steps.png"))
        plot_paths.append(plot_quality_vs_latency(rows, metric, out / "plots" / f"{metric}_vs_latency.png"))

    result = BenchmarkResult(rows, report, grid_path, plot_paths, protocol, images=image_dirs)
    if tracking_run is not None:
        _log(tracking_run, result, configs)
        result.run_id = tracking_run.run_id
    return result


def fid_row(result: Any) -> dict[str, Any]:
    """A report row's FID/KID fields from a :class:`~distill_eval.protocol.FIDResult`: fid, fid_ci95_low/high
    (when it has an interval), kid (mean over subsets), kid_std, kid_subset_size."""
    row = {"fid": result.fid, "kid": result.kid_mean, "kid_std": result.kid_std,
           "kid_subset_size": result.kid_subset_size}
    if result.fid_interval is not None:
        row.update(fid_ci95_low=result.fid_interval.low, fid_ci95_high=result.fid_interval.high,
                   fid_bootstrap_seconds=result.fid_interval.seconds)
    return row


def finite(value: Any) -> bool:
    """A number that may be written as a tag or metric (not None, bool, NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _condition_rule(generator: Any, prompts: Sequence[str] | None) -> str:
    """The rule giving image i its condition (see :func:`conditions_for`), as a cache-key string."""
    if generator.condition_kind == "class":
        return f"class: i % {int(getattr(generator, 'num_classes', 10))}"
    text = json.dumps(list(prompts or []))
    return f"prompts: i % {len(prompts or [])}, sha256 {hashlib.sha256(text.encode()).hexdigest()}"


def _grid_indices(conditions: Sequence[Any], n_rows: int) -> list[int]:
    """First index of each distinct condition (so rows show different classes/prompts), then fill."""
    seen, idx = set(), []
    for i, c in enumerate(conditions):
        if c not in seen:
            seen.add(c)
            idx.append(i)
        if len(idx) == n_rows:
            return idx
    return (idx + [i for i in range(len(conditions)) if i not in idx])[:n_rows]


def _load_one(folder: Path, i: int) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(folder / f"{i:05d}.png").convert("RGB"))).permute(2, 0, 1).float() / 255


def _batched(metric: Callable, a: torch.Tensor, b: torch.Tensor, batch_size: int) -> float:
    vals = []
    with torch.inference_mode():
        for i in range(0, a.shape[0], batch_size):
            vals.append(metric(a[i : i + batch_size], b[i : i + batch_size]).reshape(-1))
    return float(torch.cat(vals).mean())


def _prompts(cfg: BenchmarkConfig) -> list[str]:
    from distill_common.data.prompts import coco_prompt_subset, load_prompts_file
    from distill_common.data.root import resolve_data_root

    if cfg.prompts:
        return list(cfg.prompts)
    if cfg.prompts_file is not None:
        return load_prompts_file(cfg.prompts_file)
    if cfg.coco_prompts:
        return coco_prompt_subset(resolve_data_root(cfg.data_root) / "coco2017", cfg.coco_prompts, seed=cfg.seed)
    raise ConfigError("a prompt generator needs prompts; pass --prompts-file or --coco-prompts N")


def intended_classes(conditions: Sequence[Any]) -> list[int] | None:
    """The CIFAR-10 class each condition asks for (class labels as they are, prompts by the class they name), or
    None when some condition names no class (class accuracy does not apply)."""
    from distill_common.reference_sd.captions import class_of_caption

    out = []
    for c in conditions:
        label = c if isinstance(c, int) else class_of_caption(str(c))
        if label is None or not 0 <= label < len(CIFAR10_CLASSES):
            return None
        out.append(int(label))
    return out


def _class_judge(console: Any):
    from distill_common.errors import ModelLoadError
    from distill_eval.classifier import load_classifier

    try:
        return load_classifier()
    except ModelLoadError as exc:
        console.print(f"[yellow]class accuracy unavailable:[/] {exc}")
        return None


def _lpips(net: str):
    from distill_eval.lpips_metric import LPIPSMetric

    metric = LPIPSMetric(net=net, value_range=(0, 1))  # generated images are in [0, 1]
    return lambda a, b: metric(a, b)


def _clip(model: str | None, console: Any):
    """A CLIPScore function, or None (column marked unavailable) when no CLIP model can be loaded."""
    if not model:
        console.print("[yellow]CLIPScore unavailable:[/] no --clip-model given (a hub id or a local CLIP folder)")
        return None
    from distill_eval.clip_score import CLIPScorer

    try:
        scorer = CLIPScorer.from_pretrained(model)
    except DistillError as exc:
        console.print(f"[yellow]CLIPScore unavailable:[/] {exc}")
        return None
    return lambda images, texts: scorer(images, list(texts)).mean()


class _FidEvaluator:
    """Inception features of the reference set once (cached), then FID/KID per generated set."""

    def __init__(self, cfg: BenchmarkConfig, resolution: int):
        from distill_eval.inception import InceptionFeatureExtractor
        from distill_eval.reference_stats import protocol_resize, reference_stats

        resize = protocol_resize(cfg.reference) if cfg.resize == "auto" else cfg.resize
        self.extractor = InceptionFeatureExtractor(resize=resize, precision=cfg.feature_precision)
        self.ref = reference_stats(cfg.reference, self.extractor, n=cfg.reference_n, resolution=resolution,
                                   data_root=cfg.data_root)
        self.batch_size = cfg.batch_size
        self.resamples = cfg.bootstrap_resamples
        self.seed = cfg.seed
        self.last = None

    def __call__(self, images: torch.Tensor, folder: Path):
        """FID/KID of ``images``, read from the cached image ``folder``, where their features are cached too."""
        from distill_eval.fid import extract_generated_features, fid_kid_result

        features = cached_features(folder, images.shape[0], self.extractor, lambda: extract_generated_features(
            images, self.extractor, self.batch_size, progress=False)[0])
        self.last = fid_kid_result(features, self.ref, self.extractor.extractor_hash, int(images.shape[-1]),
                                   seed=self.seed, bootstrap_resamples=self.resamples,
                                   feature_precision=getattr(self.extractor, "precision", "fp32"), progress=False)
        return self.last

    def protocol_dict(self, generated_n: int) -> dict[str, Any]:
        return self.ref.protocol(generated_n).as_dict()


def _log(run: Any, result: BenchmarkResult, configs: Sequence[_Config]) -> None:
    """Metrics per configuration, report files, grid and plots; link evaluated registry versions."""
    from distill_common import tracking

    for row in result.rows:
        prefix = f"{row['model']}.s{row['steps']}"
        run.log_metrics({f"{prefix}.{k}": v for k, v in row.items() if finite(v) and k != "steps"})
    for p in result.report_paths.values():
        run.log_artifact(p, "report")
    if result.grid_path:
        run.log_artifact(result.grid_path, "grids")
    for p in result.plot_paths:
        run.log_artifact(p, "plots")
    tags = {"evaluated": ", ".join(sorted({c.uri for c in configs}))}
    if result.protocol:
        tags.update({f"protocol.{k}": v for k, v in result.protocol.items()})
    run.set_tags(tags)
    # Stamp the numbers on the evaluated registry versions (eval.s{steps}.{metric}).
    for c, row in zip(configs, result.rows, strict=True):
        if not c.uri.startswith("models:/"):
            continue
        name, version = c.version
        if name is None:
            continue
        stamp = {f"eval.s{c.steps}.{k}": row[k] for k in STAMPED if finite(row.get(k))}
        stamp["eval.run_id"] = run.run_id
        if result.protocol:
            stamp["eval.protocol"] = json.dumps(result.protocol, sort_keys=True)
        tracking.set_version_tags(name, version, stamp)
