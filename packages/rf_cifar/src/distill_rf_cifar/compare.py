"""``distill rf compare``: every distillation method from the same teacher under the same budget, in one table.

Methods are recipe names: by default every registered student recipe (recipes.RECIPES without ``teacher``), so a
recipe added to the registry joins the comparison by name. Budget: the same number of optimizer steps, batch size and
learning rate for every method (``--train-*``; a multi-phase recipe splits its steps between phases), or with
``--budget wall_clock`` (``--preset real``) the same training seconds, turned into a step count per method by a timed
calibration (:func:`wall_clock_steps`); stated in the report. Each method is trained by ``distill rf distill``'s stage
(a child MLflow run that registers its generator), then all of them and the teacher are scored by the rf evaluation
(``evaluation.run_sweep``: same seeds and classes, FID with whatever interval distill_eval reports, class accuracy,
ms per image) at 1, 2 and 4 steps, plus LPIPS to the teacher's image at the same seed (the teacher at its default
steps). Output under ``<output-dir>``: ``compare.{md,csv,json}``, ``compare.png`` (FID against steps, one line per
method), the sweep's grid; MLflow: a parent run with the table and plot and, per method, its child run carrying the
method's ``compare.s{steps}.*`` metrics. Reruns skip what is done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distill_common import checkpoint as ckpt
from distill_common import tracking
from distill_common.errors import ConfigError, DistillError, unknown_choice
from distill_common.output_dir import claims_output_dir
from distill_rf_cifar.config import CompareConfig, DistillConfig, RoundsEvalConfig
from distill_rf_cifar.stages import StageOutcome, distill_student, make_pairs

EXCLUDED = ("teacher",)  # recipes that are not students of a teacher


def compare_methods() -> list[str]:
    """The registry of comparable methods: every recipe except the teacher's, in registration order."""
    from distill_rf_cifar.recipes import RECIPES

    return [name for name in RECIPES if name not in EXCLUDED]


def select_methods(requested: list[str]) -> list[str]:
    from distill_rf_cifar.config import RENAMED_RECIPES

    available = compare_methods()
    requested = [RENAMED_RECIPES.get(name, name) for name in requested]  # "four_step": the old name of k_step
    for name in requested:
        if name not in available:
            raise unknown_choice("compare method", name, available)
    return list(dict.fromkeys(requested)) or available


def resolve_teacher(spec: str) -> Path:
    """A teacher generator folder from a folder, a shipped name (``reference``), or a models:/ or runs:/ URI."""
    from distill_common.generator import resolve_generator_folder

    folder = resolve_generator_folder(spec)
    if not (folder / "generator.json").is_file():
        raise ConfigError(f"--teacher {spec} holds no generator.json; pass a generator folder written by 'distill rf "
                          "train-teacher', a models:/ URI, or 'reference'")
    return folder


@dataclass
class CompareResult:
    folder: Path
    rows: list[dict[str, Any]]
    report_paths: dict[str, Path]
    plot_path: Path
    grid_path: Path
    parent_run_id: str | None
    child_run_ids: dict[str, str | None] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _fid_interval(row: dict[str, Any]) -> tuple[float, float] | None:
    """The FID's interval when the evaluation reports one (keys fid_*low*/fid_*high*, or a 2-sequence fid_ci*)."""
    lo = next((v for k, v in row.items() if k.startswith("fid_") and ("low" in k or k.endswith("_lo"))), None)
    hi = next((v for k, v in row.items() if k.startswith("fid_") and ("high" in k or k.endswith("_hi"))), None)
    if lo is None or hi is None:
        ci = next((v for k, v in row.items() if k.startswith("fid_ci") and isinstance(v, (list, tuple))), None)
        lo, hi = (ci[0], ci[1]) if ci and len(ci) == 2 else (None, None)
    return (float(lo), float(hi)) if lo is not None and hi is not None else None


def _lpips_to_teacher(image_dirs: dict[str, Path], reference_key: str, n: int, net: str) -> dict[str, float]:
    """Mean LPIPS of every configuration's image i to the teacher's image i (same seed and class), at 32 px."""
    from distill_eval.benchmark import load_png_folder
    from distill_eval.lpips_metric import LPIPSMetric

    metric = LPIPSMetric(net=net, value_range=(0, 1))
    reference = load_png_folder(image_dirs[reference_key], n)
    out = {}
    with torch.inference_mode():
        for key, folder in image_dirs.items():
            images = load_png_folder(folder, n)
            out[key] = float(torch.cat([metric(images[i : i + 64], reference[i : i + 64])
                                        for i in range(0, n, 64)]).mean())
    return out


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """FID against steps, one line per method (teacher dashed), with interval bars when the evaluation gives them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["steps"], r["fid"], _fid_interval(r)) for r in rows if r["method"] == method)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        style = dict(linestyle="--", color="black") if method == "teacher" else {}
        line = ax.plot(xs, ys, marker="o", label=method, **style)[0]
        if all(p[2] for p in pts):
            lows = [y - p[2][0] for y, p in zip(ys, pts, strict=True)]
            highs = [p[2][1] - y for y, p in zip(ys, pts, strict=True)]
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt="none", ecolor=line.get_color(), capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps (NFE per method in the table: a CFG step counts 2)")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


COLUMNS = ["method", "steps", "sampler", "guidance", "nfe", "fid", "kid", "class_accuracy", "lpips_to_teacher",
           "ms_per_image", "train_seconds", "train_steps"]
CALIBRATION_FILE = "calibration.json"


def calibrate_method(method: str, cfg: CompareConfig, teacher_dir: Path, data: dict[str, Any], folder: Path,
                     train: Any) -> float:
    """Seconds per optimizer step of ``method``: each phase trains one untimed step, then ``cfg.calibration_steps``
    timed ones (a resume of the same run, so start-up costs stay out), in the one loop on the real data; the phases'
    times are weighted by their shares of the method's steps."""
    import shutil

    from distill_rf_cifar.config import FlowConfig
    from distill_rf_cifar.generator import load_generator, load_model
    from distill_rf_cifar.recipes import build_recipe, combine_data
    from distill_rf_cifar.training.loop import train as train_loop

    teacher = load_generator(teacher_dir, device="cpu")
    guidance = teacher.default_guidance if cfg.options.target_guidance is None else cfg.options.target_guidance
    phases = build_recipe(method, cfg.options, FlowConfig(), train.steps, teacher_steps=teacher.default_steps,
                          guidance=guidance)
    data = combine_data(phases, data)
    model = load_model(teacher_dir)
    total, seconds = sum(p.steps for p in phases), 0.0
    for i, phase in enumerate(phases):
        start = model
        if phase.student is not None:
            model = phase.student(model)
        run = folder / method / phase.name
        shutil.rmtree(run, ignore_errors=True)
        loop = dataclasses.replace(train, steps=1 + cfg.calibration_steps, checkpoint_every=10**9, log_every=10**9,
                                   sample_every=0, seed=train.seed + i)
        probe = phase.make_loss(start if phase.student is not None else model)
        train_loop(dataclasses.replace(loop, stop_at_step=1), model, probe, data[phase.data], run, progress=False)
        result, model, _ = train_loop(loop, model, probe, data[phase.data], run, progress=False)
        seconds += phase.steps / total / result.steps_per_second
        shutil.rmtree(run, ignore_errors=True)
    return seconds


def wall_clock_steps(cfg: CompareConfig, methods: list[str], teacher_dir: Path, out: Path, train: Any,
                     console: Console) -> tuple[dict[str, int], dict[str, Any]]:
    """Steps per method for the same training wall clock (``--budget wall_clock``): calibrated seconds per step
    (kept in ``calibration.json``, so a rerun trains the same step counts), the budget (``--budget-seconds``, or the
    slowest method's ``--train-steps`` steps), and steps = max(--train-steps, floor(budget / seconds per step))."""
    from distill_rf_cifar.pairs import load_pairs
    from distill_rf_cifar.recipes import build_recipe, recipe_data_kinds
    from distill_rf_cifar.training.data import load_cifar_training_data

    path = out / CALIBRATION_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    per_step: dict[str, float] = dict(known.get("seconds_per_step", {}))
    todo = [m for m in methods if m not in per_step]
    if todo:
        from distill_rf_cifar.config import FlowConfig

        kinds: set[str] = set()
        for m in todo:
            try:
                kinds |= recipe_data_kinds(build_recipe(m, cfg.options, FlowConfig(), train.steps))
            except DistillError:  # refused options: reported when the method trains, the others go on
                continue
        data: dict[str, Any] = {}
        if "pairs" in kinds:
            data["pairs"] = load_pairs(out / "pairs", teacher_dir)
        if "images" in kinds:
            data["images"] = load_cifar_training_data(cfg.data.resolved_root(), cfg.data.source, cfg.data.limit,
                                                      cfg.data.random_flip, show_progress=False, strict=cfg.data.strict)
        for m in todo:
            try:
                per_step[m] = calibrate_method(m, cfg, teacher_dir, data, out / "calibration", train)
            except DistillError as exc:  # reported again, with the others going on, when the method trains
                console.print(f"[red]{m}: calibration failed:[/] {exc}", highlight=False)
                continue
            console.print(f"  calibration {m}: {per_step[m]:.3f} s per step", highlight=False)
            ckpt.write_json(path, {**known, "seconds_per_step": per_step})
    measured = [m for m in methods if m in per_step]
    budget = (cfg.budget_seconds or known.get("budget_seconds")
              or max((per_step[m] for m in measured), default=0.0) * train.steps)
    steps = {m: max(train.steps, int(budget / per_step[m] + 1e-9)) for m in measured}  # whole steps inside the clock
    over = [m for m in measured if per_step[m] * steps[m] > budget * 1.001]  # held at --train-steps, slower
    info = {"seconds_per_step": per_step, "budget_seconds": budget, "steps": steps, "over_budget": over,
            "calibration_steps": cfg.calibration_steps}
    ckpt.write_json(path, info)
    return steps, info


@claims_output_dir(lambda cfg: cfg.folder)  # re-entrant under the CLI's claim; a library call takes it too
def run_compare(cfg: CompareConfig, *, console: Console | None = None, progress: bool = True,
                classifier: Any = None) -> CompareResult:
    """Train (or reuse) every method, evaluate all of them with the teacher, write the table, plot and runs.
    ``classifier``: the class-accuracy network (default: ``cfg.eval.classifier``, distill_eval's shipped one)."""
    from distill_common.generator import read_generator_manifest
    from distill_eval.reports import write_report
    from distill_rf_cifar.evaluation import run_sweep
    from distill_rf_cifar.generator import load_generator

    console = console or Console()
    start = time.perf_counter()
    out = cfg.folder
    out.mkdir(parents=True, exist_ok=True)
    methods = select_methods(cfg.methods)
    teacher_dir = resolve_teacher(cfg.teacher)
    teacher_manifest = read_generator_manifest(teacher_dir)
    budget = (f"{cfg.train.steps} optimizer steps per method, batch {cfg.train.batch_size}, lr {cfg.train.learning_rate:g} "
              "(multi-phase recipes split the steps)")
    device = cfg.device
    train = dataclasses.replace(cfg.train, device=device if device != "auto" else cfg.train.device)
    outcomes: dict[str, StageOutcome] = {}
    failed: dict[str, str] = {}
    with tracking.start_run(cfg.experiment, f"compare-{cfg.run_name}", config=cfg, fallback_dir=out, enabled=cfg.track,
                            tags={"stage": "compare", "compare.methods": ",".join(methods), "compare.budget": budget,
                                  "teacher": str(cfg.teacher)}) as parent:
        console.rule(f"[bold]pairs[/] → {out / 'pairs'}")
        pairs_cfg = dataclasses.replace(cfg.pairs, teacher=teacher_dir, output_dir=out / "pairs",
                                        experiment=cfg.experiment, track=cfg.track)
        if cfg.pairs_match_teacher:
            sampler = teacher_manifest.get("sampler", "euler")
            pairs_cfg = dataclasses.replace(pairs_cfg, steps=int(teacher_manifest.get("default_steps", pairs_cfg.steps)),
                                            guidance=float(teacher_manifest.get("default_guidance", 1.0)),
                                            sampler=sampler if sampler in ("euler", "heun", "rk45") else "euler")
        if device != "auto":
            pairs_cfg.device = device
        make_pairs(pairs_cfg, console=console, progress=progress, run_name="compare-pairs", nested=True)
        method_steps: dict[str, int] = {m: train.steps for m in methods}
        if cfg.budget == "wall_clock":
            console.rule("[bold]calibration[/]: seconds per optimizer step of every method")
            method_steps, calibration = wall_clock_steps(cfg, methods, teacher_dir, out, train, console)
            budget = (f"the same training wall clock per method, {calibration['budget_seconds'] / 60:.1f} min "
                      f"(seconds per step calibrated over {cfg.calibration_steps} timed steps per phase; steps per "
                      f"method: {', '.join(f'{m} {n}' for m, n in method_steps.items())}; at least {train.steps}"
                      + (f"; over the clock at that minimum: {', '.join(calibration['over_budget'])}"
                         if calibration["over_budget"] else "")
                      + f"), batch {cfg.train.batch_size}, lr {cfg.train.learning_rate:g}")
            parent.set_tags({"compare.budget": budget})
        for i, method in enumerate(methods):
            console.rule(f"[bold]{i + 1}/{len(methods)} {method}[/] → {out / 'students' / method}")
            dcfg = DistillConfig(recipe=method, teacher=teacher_dir, pairs=out / "pairs", output_dir=out / "students" / method,
                                 options=cfg.options, train=dataclasses.replace(train, steps=method_steps.get(
                                     method, train.steps)), data=cfg.data,
                                 experiment=cfg.experiment, run_name=f"compare-{cfg.run_name}-{method}", track=cfg.track,
                                 rounds=RoundsEvalConfig(num_images=0))  # compare scores the final student itself
            try:
                outcome = distill_student(dcfg, console=console, progress=progress, nested=True)
            except DistillError as exc:  # one method's refusal (e.g. a recipe needing a CFG teacher) is reported
                failed[method] = str(exc)
                console.print(f"[red]{method} failed:[/] {exc}", highlight=False)
                continue
            if outcome.finished:
                outcomes[method] = outcome
            else:
                failed[method] = "stopped before the end of its budget (--train-stop-at-step)"

        console.rule(f"[bold]evaluation[/] → {out / 'eval'}")
        teacher_gen = load_generator(teacher_dir, device=device)
        students = [(m, load_generator(o.generator_dir, device=device)) for m, o in outcomes.items()]
        eval_cfg = dataclasses.replace(cfg.eval, student_steps=list(cfg.eval.student_steps))
        sweep = run_sweep(("teacher", teacher_gen), students, eval_cfg, out / "eval", data_root=cfg.data.resolved_root(),
                          console=console, progress=progress, classifier=classifier)
        reference_key = f"teacher_s{teacher_gen.default_steps}"
        lpips = (_lpips_to_teacher(sweep.image_dirs, reference_key, eval_cfg.num_images, cfg.lpips_net)
                 if cfg.lpips else {})
        rows = []
        for r in sweep.rows:
            if r["steps"] is None:  # RK45 teacher: outside the steps axis of this table
                continue
            method = r["model"]
            info = outcomes[method].info if method in outcomes else {}
            rows.append({"method": method, "steps": r["steps"], "sampler": r["sampler"],
                         "guidance": r["guidance"], "nfe": r["nfe"],
                         "fid": r["fid"],
                         **{k: v for k, v in r.items() if k.startswith(("fid_", "class_acc"))}, "kid": r["kid"],
                         "lpips_to_teacher": lpips.get(r["key"]), "ms_per_image": r["ms_per_image"],
                         "train_seconds": info.get("train_seconds", math.nan) if method != "teacher" else None,
                         "train_steps": info.get("steps") if method != "teacher" else None})
        meta = {"teacher": f"{cfg.teacher} ({teacher_dir}), default {teacher_gen.default_steps} steps, guidance "
                           f"{teacher_gen.default_guidance:g}",
                "budget": budget, "protocol": sweep.protocol,
                "lpips": f"{cfg.lpips_net}, 32 px, to {reference_key} at the same seed" if cfg.lpips else "off",
                "seeds": f"0..{eval_cfg.num_images - 1}, class = seed % 10", "failed": failed or "none"}
        report = write_report(rows, out, "compare", columns=COLUMNS, meta=meta)
        title = (f"FID ({sweep.protocol['generated_n']} vs {sweep.protocol['reference_n']} "
                 f"{sweep.protocol['reference_set']}) after {cfg.train.steps} steps per method")
        plot = _plot(rows, out / "compare.png", title)

        child_ids: dict[str, str | None] = {}
        for method, outcome in outcomes.items():
            child_ids[method] = outcome.run_id
            if outcome.run_id and cfg.track:
                child = tracking.TrackingRun(outcome.run_id, outcome.folder)
                child.log_metrics({f"compare.s{r['steps']}.{k}": r[k] for r in rows if r["method"] == method
                                   for k in ("fid", "kid", "class_acc", "lpips_to_teacher", "ms_per_image")
                                   if r.get(k) is not None})
                child.set_tags({"compare.parent_run_id": parent.run_id, "compare.budget": budget})
        parent.log_metrics({f"{r['method']}.s{r['steps']}.{k}": r[k] for r in rows
                            for k in ("fid", "lpips_to_teacher", "ms_per_image") if r.get(k) is not None})
        parent.set_tags({"compare.children": ",".join(f"{m}={i}" for m, i in child_ids.items()),
                         **({"compare.failed": ",".join(failed)} if failed else {})})
        for p in [*report.values(), plot, sweep.grid_path]:
            parent.log_artifact(p, "compare")
    seconds = time.perf_counter() - start
    ckpt.write_json(out / "compare_summary.json", {"seconds": round(seconds, 1), "methods": methods, "failed": failed,
                                                    "parent_run_id": parent.run_id, "children": child_ids})
    return CompareResult(out, rows, report, plot, sweep.grid_path, parent.run_id, child_ids, failed, seconds)


def print_compare(result: CompareResult, console: Console) -> None:
    from distill_eval.reports import print_table

    print_table(result.rows, ["method", "steps", "fid", "class_accuracy", "lpips_to_teacher", "ms_per_image",
                              "train_seconds", "train_steps"], title=f"rf compare ({result.folder})", console=console)
    for method, reason in result.failed.items():
        console.print(f"[red]{method}[/]: {reason}", highlight=False)
    console.print(f"table: {result.report_paths['md']}\nplot: {result.plot_path}\ngrid: {result.grid_path}\n"
                  f"finished in {result.seconds / 60:.1f} min", highlight=False)
