"""The FID-vs-NFE sweep: the teacher at several Euler step counts and with RK45, every student at 1, 2, 4 steps,
all on the same conditions and seeds, scored against one CIFAR-10 reference set under one protocol.

Thin on purpose: images are generated into resumable PNG folders (distill_eval.benchmark), FID/KID come from
distill_eval.fid with cached reference statistics (distill_eval.reference_stats), pictures from
distill_eval.grids / plots, reports from distill_eval.reports. Latency is read off the generation pass itself
(device-synchronised, after one warm-up call per model; CPU Inception time is too precious to generate twice),
with distill_eval.timing as the fallback when the images already existed. Each configuration's numbers are kept
in ``images/<config>/result.json``, so a rerun rescoring nothing costs nothing. Classes cycle 0..9 over seeds
0..N-1, so grid row c shows seed c in every column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from distill_common import checkpoint as ckpt
from distill_common.data.cifar10 import CIFAR10_CLASSES
from distill_common.errors import ConfigError
from distill_common.runtime import environment_info, timed
from distill_rf_cifar.config import EvalConfig
from distill_rf_cifar.generator import RFGenerator

RK45 = "rk45"
RESULT_FILE = "result.json"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class SweepEntry:
    label: str  # model label: "teacher", "four_step", ...
    role: str  # "teacher" | "student"
    generator: RFGenerator
    sampler: str  # "euler" | "rk45"
    steps: int  # Euler steps (for rk45: the generator's default steps, unused)

    @property
    def key(self) -> str:
        return f"{self.label}_{RK45}" if self.sampler == RK45 else f"{self.label}_s{self.steps}"


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    protocol: dict[str, Any]
    grid_path: Path
    plot_paths: list[Path]
    report_paths: dict[str, Path]
    image_dirs: dict[str, Path] = field(default_factory=dict)


class _BoundSampler:
    """A generator with its sampler fixed, shaped like the Generator protocol for distill_eval's helpers; it times
    every call (device-synchronised) and records the NFE, so the evaluation pass doubles as the latency run."""

    def __init__(self, generator: RFGenerator, sampler: str) -> None:
        self.generator, self.sampler = generator, sampler
        self.family, self.condition_kind, self.resolution = generator.family, generator.condition_kind, generator.resolution
        self.default_steps, self.device, self.dtype = generator.default_steps, generator.device, generator.dtype
        self.nfe: list[int] = []
        self.seconds, self.images = 0.0, 0

    def generate(self, conditions, num_steps, seeds, guidance=None):
        with timed(self.device) as t:
            images = self.generator.generate(conditions, num_steps, seeds, guidance, sampler=self.sampler)
        self.seconds += t["seconds"]
        self.images += len(conditions)
        self.nfe.append(self.generator.last_nfe)
        return images


def effective_guidance(generator: RFGenerator) -> float:
    """The CFG scale a generator's images carry: its sampling guidance, or for a student distilled at w = 1 from
    guided pairs the teacher's guidance baked into them (``teacher_guidance`` in its generator.json)."""
    baked = generator.info.get("teacher_guidance")
    conditioned = bool(generator.info.get("guidance_conditioned"))  # w is an input: its sampling w is the CFG scale
    if generator.role != "teacher" and not conditioned and generator.default_guidance == 1.0 and baked is not None:
        return float(baked)
    return generator.default_guidance


def sweep_entries(teacher: tuple[str, RFGenerator], students: Sequence[tuple[str, RFGenerator]],
                  cfg: EvalConfig) -> list[SweepEntry]:
    label, gen = teacher
    steps = sorted(set(cfg.teacher_steps) | {gen.default_steps})
    entries = [SweepEntry(label, "teacher", gen, "euler", s) for s in steps]
    if cfg.teacher_rk45:
        entries.append(SweepEntry(label, "teacher", gen, RK45, gen.default_steps))
    for s_label, s_gen in students:
        sampler = s_gen.sampler if s_gen.sampler != RK45 else "euler"  # e.g. consistency students keep theirs
        steps = [s_gen.default_steps] if cfg.students_at_own_steps else sorted(set(cfg.student_steps))
        entries += [SweepEntry(s_label, "student", s_gen, sampler, s) for s in steps]
    if len({e.key for e in entries}) != len(entries):
        raise ConfigError("two models share a label; give every student its own LABEL=... name")
    return entries


def run_sweep(
    teacher: tuple[str, RFGenerator],
    students: Sequence[tuple[str, RFGenerator]],
    cfg: EvalConfig,
    output_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    console: Console | None = None,
    progress: bool = True,
    entries: Sequence[SweepEntry] | None = None,
    classifier: Any = None,
) -> SweepResult:
    """Generate, score and time every configuration; write report, grid and plots under ``output_dir``.

    ``entries`` replaces the configurations :func:`sweep_entries` derives from ``cfg`` (e.g. one per progressive
    round at its own step count); it must hold the teacher at its default Euler steps, the speed-up baseline.
    ``classifier``: the network of the class accuracy (default: ``cfg.classifier`` loaded by distill_eval)."""
    from distill_eval.benchmark import (
        fid_row,
        generate_to_folder,
        generator_fingerprint,
        image_cache_key,
        load_png_folder,
    )
    from distill_eval.fid import score_images
    from distill_eval.grids import comparison_grid
    from distill_eval.inception import InceptionFeatureExtractor
    from distill_eval.plots import plot_quality_vs_latency, plot_quality_vs_steps
    from distill_eval.reference_stats import reference_stats
    from distill_eval.reports import compact_fid, interval_note, mark_separability, write_report
    from distill_eval.timing import measure_latency

    console = console or Console()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = list(entries) if entries is not None else sweep_entries(teacher, students, cfg)
    for e in entries:  # one generation precision for every row
        e.generator.use_precision(cfg.sample_precision)
    n = cfg.num_images
    if n < 2:
        raise ConfigError("FID needs at least 2 images per configuration; pass --eval-num-images 2 or more")
    num_classes = max(teacher[1].num_classes, 1)
    conditions = [i % num_classes for i in range(n)]
    seeds = list(range(n))

    # 1. images, resumable; the pass is timed (after a warm-up call per model) and its NFE recorded
    bound = {e.key: _BoundSampler(e.generator, e.sampler) for e in entries}
    image_dirs = {e.key: out / "images" / e.key for e in entries}
    sidecars = {e.key: _read_json(image_dirs[e.key] / RESULT_FILE) for e in entries}
    fresh: set[str] = set()
    warmed: set[int] = set()
    for e in entries:  # images of an earlier sweep in another precision are not mixed with new ones
        made_in = sidecars[e.key].get("sample_precision", "fp32") if sidecars[e.key] else e.generator.precision
        if made_in != e.generator.precision:
            raise ConfigError(f"{image_dirs[e.key]} holds images generated in {made_in}, this sweep generates in "
                              f"{e.generator.precision}; set the evaluation's sample precision to {made_in} "
                              "(--eval-sample-precision) or use another output folder")
    # every folder is keyed by what made its images (weights, sampler, steps, guidance, seeds, classes, precision):
    # a folder of another model or setting is regenerated, never scored as this one's
    fingerprints: dict[int, str] = {}
    keys: dict[str, dict[str, Any]] = {}
    for e in entries:
        fp = fingerprints.setdefault(id(e.generator), generator_fingerprint(e.generator))
        keys[e.key] = image_cache_key(e.generator, e.steps, seed=seeds[0], condition_rule=f"class: i % {num_classes}",
                                      guidance=None, fingerprint=fp, extra={"sampler": e.sampler})
        folder, side = image_dirs[e.key], sidecars[e.key]
        pngs = sorted(folder.glob("[0-9][0-9][0-9][0-9][0-9].png"))
        if side.get("cache_key") == keys[e.key]:
            if pngs:
                console.print(f"[yellow]note:[/] {e.key}: reusing {len(pngs)} cached image(s) in {folder} (same "
                              "weights, sampler, steps, guidance, seeds and precision)", highlight=False)
            continue
        if pngs or side:
            old = side.get("cache_key") or {}
            changed = sorted(k for k in set(keys[e.key]) | set(old) if old.get(k) != keys[e.key].get(k))
            why = f"{', '.join(changed)} changed" if old else "they carry no cache key"
            if pngs:
                console.print(f"[yellow]note:[/] {e.key}: {len(pngs)} cached image(s) in {folder} were made with other "
                              f"settings ({why}); regenerating", highlight=False)
            for png in pngs:
                png.unlink()
            (folder / RESULT_FILE).unlink(missing_ok=True)
            sidecars[e.key] = {}
    with Progress(console=console, disable=not progress) as bar:
        for e in entries:
            missing = [i for i in range(n) if not (image_dirs[e.key] / f"{i:05d}.png").is_file()]
            if missing and not sidecars[e.key]:  # mark the folder's key before its first image exists
                image_dirs[e.key].mkdir(parents=True, exist_ok=True)
                sidecars[e.key] = {"sample_precision": e.generator.precision, "cache_key": keys[e.key]}
                ckpt.write_json(image_dirs[e.key] / RESULT_FILE, sidecars[e.key])
            if missing and id(e.generator) not in warmed:  # first-call costs (allocations, kernels) stay out of timings
                e.generator.generate(conditions[: min(cfg.batch_size, len(missing))], 1,
                                     seeds[: min(cfg.batch_size, len(missing))])
                warmed.add(id(e.generator))
            made = generate_to_folder(bound[e.key], e.steps, conditions, seeds, image_dirs[e.key], guidance=None,
                                      batch_size=cfg.batch_size, progress=bar, description=f"generate {e.key}")
            if made:
                fresh.add(e.key)
                b = bound[e.key]
                sidecars[e.key] = {"nfe": sum(b.nfe) / len(b.nfe), "ms_per_image": 1000 * b.seconds / b.images,
                                   "images_timed": b.images, "timing": f"generation pass, batch {cfg.batch_size}",
                                   "sample_precision": e.generator.precision, "cache_key": keys[e.key]}

    # 2. FID/KID against cached reference statistics (reused from the sidecar when no image changed)
    extractor = InceptionFeatureExtractor(precision=cfg.feature_precision)
    reference = reference_stats(cfg.reference, extractor, n=cfg.reference_n, resolution=32, data_root=data_root,
                                progress=progress)
    protocol = reference.protocol(n).as_dict()
    rows: list[dict[str, Any]] = []
    for e in entries:
        side = sidecars[e.key]
        if (e.key in fresh or side.get("protocol") != protocol or "fid" not in side
                or side.get("bootstrap_resamples", 0) != cfg.bootstrap_resamples):
            res = score_images(load_png_folder(image_dirs[e.key], n), extractor, reference, batch_size=50,
                               progress=progress, bootstrap_resamples=cfg.bootstrap_resamples)
            for stale in ("fid_ci95_low", "fid_ci95_high", "fid_bootstrap_seconds"):
                side.pop(stale, None)
            side.update({**fid_row(res), "protocol": protocol, "bootstrap_resamples": cfg.bootstrap_resamples})
        if "ms_per_image" not in side:  # images were all on disk from an earlier run without timings
            timing = measure_latency(
                lambda e=e: bound[e.key].generate(conditions[: cfg.timing_batch], e.steps, seeds[: cfg.timing_batch]),
                label=e.key, batch_size=min(cfg.timing_batch, n), device=e.generator.device, warmup=1,
                repeats=cfg.timing_repeats, dtype=str(e.generator.dtype))
            side.update({"ms_per_image": timing.ms_per_image, "nfe": bound[e.key].nfe[-1],
                         "timing": f"separate, batch {min(cfg.timing_batch, n)}"})
        side.setdefault("nfe", float(e.steps))
        side.setdefault("sample_precision", e.generator.precision)
        ckpt.write_json(image_dirs[e.key] / RESULT_FILE, side)
        rows.append({"model": e.label, "role": e.role, "sampler": e.sampler,
                     "steps": e.steps if e.sampler != RK45 else None, "nfe": side["nfe"],
                     "guidance": e.generator.default_guidance, "effective_guidance": effective_guidance(e.generator),
                     "precision": e.generator.precision, "fid": side["fid"],
                     **{k: side[k] for k in ("fid_ci95_low", "fid_ci95_high") if k in side},
                     "kid": side["kid"], "kid_std": side["kid_std"], "ms_per_image": side["ms_per_image"],
                     "images_per_second": 1000.0 / side["ms_per_image"], "key": e.key})
        console.print(f"  {e.key:>16}  FID {compact_fid(side, 2):>14}  NFE {side['nfe']:4.0f}  "
                      f"{side['ms_per_image']:7.1f} ms per image", highlight=False)  # 62 columns: never wraps
    _add_class_accuracy(rows, entries, image_dirs, sidecars, conditions, cfg, classifier, fresh, console)
    teacher_label, teacher_gen = teacher
    base = next(r for r in rows if r["model"] == teacher_label and r["sampler"] == "euler"
                and r["steps"] == teacher_gen.default_steps)
    for r in rows:
        r["speedup_vs_teacher"] = base["ms_per_image"] / r["ms_per_image"]
    mark_separability(rows)  # fid_vs_best; fid_vs_teacher(_nfe): students vs the teacher at equal steps / NFE

    # 3. report, grid (rows = classes, columns = configurations, same seeds), plots
    meta = {"protocol": protocol, "intervals": interval_note(cfg.bootstrap_resamples), "seeds": f"0..{n - 1}",
            "sample_precision": ", ".join(sorted({e.generator.precision for e in entries})),
            "classes": "seed % 10",
            "teacher_reference": f"{teacher_label} euler {teacher_gen.default_steps} steps",
            "timing": f"the evaluation's generation pass (batch {cfg.batch_size}) after a warm-up call, "
                      f"device-synchronised ({teacher_gen.device}); {environment_info(teacher_gen.device)['device_name']}, "
                      f"{environment_info(teacher_gen.device)['num_threads']} threads"}
    if any("class_acc" in r for r in rows):
        meta["class_accuracy"] = (f"distill_eval classifier ({cfg.classifier if classifier is None else 'given'}), "
                                  "share of images assigned to their class, 95% Wilson interval")
    columns = ["model", "role", "sampler", "steps", "nfe", "fid", "fid_ci95_low", "fid_ci95_high", "fid_vs_best",
               "fid_vs_teacher", "fid_vs_teacher_nfe", "kid", "kid_std", "class_accuracy", "class_acc", "class_acc_ci95_low",
               "class_acc_ci95_high", "ms_per_image", "speedup_vs_teacher", "images_per_second",
               "guidance", "precision"]
    report = write_report(rows, out, "fid_vs_nfe", columns=columns, meta=meta)
    grid_rows = list(range(min(cfg.grid_classes, num_classes, n)))
    grid_columns = []
    for e, r in zip(entries, rows, strict=True):
        imgs = load_png_folder(image_dirs[e.key], max(grid_rows) + 1)[grid_rows]
        steps = "RK45" if e.sampler == RK45 else f"{e.steps} step{'' if e.steps == 1 else 's'}"
        title = f"{e.label} {steps} FID {r['fid']:.0f} {r['ms_per_image']:.1f} ms"  # wraps to 2-3 short lines
        grid_columns.append((title, imgs))
    grid_path = out / "grid.png"
    comparison_grid(grid_columns, [CIFAR10_CLASSES[c] if num_classes == 10 else str(c) for c in grid_rows], grid_path,
                    title=f"seeds {', '.join(map(str, grid_rows))} (same noise in every column)")
    plot_rows = [{**r, "model": f"{r['model']} ({r['sampler']})"} for r in rows]
    plots = [plot_quality_vs_steps(plot_rows, "fid", out / "plots" / "fid_vs_nfe.png", steps_key="nfe"),
             plot_quality_vs_latency(plot_rows, "fid", out / "plots" / "fid_vs_latency.png", steps_key="nfe")]
    return SweepResult(rows, protocol, grid_path, plots, report, image_dirs)


def _add_class_accuracy(rows: list[dict[str, Any]], entries: Sequence[SweepEntry], image_dirs: dict[str, Path],
                        sidecars: dict[str, dict[str, Any]], conditions: list[int], cfg: EvalConfig, classifier: Any,
                        fresh: set[str], console: Console) -> None:
    """``class_acc`` (+ ``class_acc_ci95_low/high``, Wilson) of every row: the share of its images that the CIFAR-10
    classifier assigns to their class (distill_eval.classifier.class_accuracy). Cached in each sidecar per
    classifier name; a classifier passed in is always rescored. Skipped with a note when the shipped weights are
    missing or the model is not a 10-class one."""
    from distill_common.errors import ModelLoadError
    from distill_eval.benchmark import load_png_folder
    from distill_eval.classifier import ClassAccuracy, class_accuracy, load_classifier

    if not cfg.class_accuracy:
        return
    name = cfg.classifier if classifier is None else None
    n = cfg.num_images
    for e, row in zip(entries, rows, strict=True):
        side = sidecars[e.key]
        if name is None or e.key in fresh or side.get("classifier") != name or "class_acc" not in side:
            if classifier is None:
                try:
                    classifier = load_classifier(cfg.classifier)
                except ModelLoadError as exc:
                    console.print(f"  class accuracy skipped: {exc}", highlight=False)
                    return
            if getattr(classifier, "num_classes", 10) != max(e.generator.num_classes, 1):
                console.print(f"  class accuracy skipped: the classifier has {classifier.num_classes} classes, "
                              f"{e.key} {e.generator.num_classes}", highlight=False)
                return
            acc = class_accuracy(load_png_folder(image_dirs[e.key], n) * 2 - 1, conditions, classifier)
            side.update({"class_acc": acc.accuracy, "class_acc_ci95_low": acc.low, "class_acc_ci95_high": acc.high,
                         "classifier": name or "given"})
            ckpt.write_json(image_dirs[e.key] / RESULT_FILE, side)
        row.update({k: side[k] for k in ("class_acc", "class_acc_ci95_low", "class_acc_ci95_high")})
        row["class_accuracy"] = ClassAccuracy(side["class_acc"], side["class_acc_ci95_low"],
                                              side["class_acc_ci95_high"], n, ()).cell()  # "91.2% [90.0, 92.3]"


def registry_tags(rows: Sequence[dict[str, Any]], label: str, protocol: dict[str, Any]) -> dict[str, Any]:
    """``eval.s{steps}.{fid,fid_ci95_low,fid_ci95_high,kid,ms_per_image,class_acc}`` (+ ``eval.rk45.*``, ``eval.protocol``)
    for one model's rows, the tags distill_common.promotion ranks versions by; non-finite values are left out."""
    from distill_eval.benchmark import finite

    tags: dict[str, Any] = {"eval.protocol": json.dumps(protocol, sort_keys=True)}
    for r in rows:
        if r["model"] != label:
            continue
        prefix = f"eval.{RK45}" if r["sampler"] == RK45 else f"eval.s{r['steps']}"
        tags.update({f"{prefix}.{k}": r[k] for k in ("fid", "fid_ci95_low", "fid_ci95_high", "kid", "ms_per_image",
                                                      "class_acc") if finite(r.get(k))})
        if r["sampler"] == RK45:
            tags[f"{prefix}.nfe"] = r["nfe"]
    return tags

