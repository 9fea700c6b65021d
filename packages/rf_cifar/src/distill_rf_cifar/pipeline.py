"""The main job, ``distill rf pipeline``: teacher -> pairs -> four-step and one-step students -> FID-vs-NFE and
latency -> MLflow registry (teacher and students as pyfunc models) -> champion -> one table.

Registry layout: teachers are versions of ``rf_cifar-teacher`` and students (tagged with their recipe) versions of
``rf_cifar-student``. The student ``champion`` is the version with the best FID at <= 4 steps (distill_common
.promotion over the ``eval.s{steps}.fid`` tags), i.e. the model to serve when only a few steps are affordable; the
teacher ``champion`` is the best teacher at any step count. Keeping the teacher out of the student name means a
student champion is always a distilled model, compared only with other students under the same protocol.

Every stage writes into ``<output-dir>/<stage>`` and records itself in ``stage.json``, so a rerun of the same
command skips what is finished, resumes what was cut off, and reuses registered versions.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distill_common import checkpoint as ckpt
from distill_common import tracking
from distill_common.config import save_config
from distill_common.errors import DistillError
from distill_common.generator import resolve_generator_folder
from distill_common.generator_folder import read_generator_manifest
from distill_common.output_dir import claims_output_dir
from distill_rf_cifar.config import (
    PipelineConfig,
    RoundsEvalConfig,
    distill_config,
    evaluate_config,
    pairs_config,
    teacher_config,
)
from distill_rf_cifar.generator import weights_sha256
from distill_rf_cifar.stages import (
    StageOutcome,
    distill_student,
    evaluate,
    make_pairs,
    stage_summary,
    train_teacher,
    use_teacher,
)

STUDENTS = ("four_step", "one_step")
SCRATCH = "scratch"  # --teacher scratch: train the teacher in this run
STAGES = ("teacher", "pairs", *STUDENTS, "evaluation")  # the numbered stages; the registry closes the last one
# The overall estimate's cost model: work in UNet forwards of one image. A training step is a forward and a backward
# (about three forwards) per image; a sampling step is one forward (two under classifier-free guidance).
TRAIN_FORWARDS = 3
SOLVER_NFE = {"euler": 1, "heun": 2, "consistency": 1}  # per step; RK45 adapts its steps: RK45_NFE per solve
RK45_NFE = 100
STAGE_KIND = {"teacher": "train", "pairs": "sample", "four_step": "train", "one_step": "train", "evaluation": "sample"}


def student_recipes(cfg: PipelineConfig) -> dict[str, str]:
    """The recipe behind each student label: the four-step student by ``four_step_recipe``, the one-step by one_step."""
    return {"four_step": cfg.four_step_recipe, "one_step": "one_step"}


@dataclass
class PipelineResult:
    folder: Path
    finished: bool
    seconds: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)
    versions: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (registered name, version)
    champions: dict[str, str] = field(default_factory=dict)  # registered name -> champion description
    champion_versions: dict[str, str] = field(default_factory=dict)  # registered name -> champion version
    grid_path: Path | None = None
    plot_paths: list[Path] = field(default_factory=list)
    report_paths: dict[str, Path] = field(default_factory=dict)
    protocol: dict[str, Any] | None = None
    ui_command: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage in this call

    def lap(self, stage: str, since: float) -> float:
        """Record ``stage`` as having taken since ``since``; returns now, the next stage's start."""
        now = time.perf_counter()
        self.stage_seconds[stage] = round(now - since, 1)
        return now


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def stage_costs(cfg: PipelineConfig) -> dict[str, float]:
    """Each numbered stage's work in UNet forwards of one image, from the configuration (see TRAIN_FORWARDS): a
    rough model, only ever used scaled by the measured speed of the stages already finished. A given teacher
    (not ``scratch``) costs nothing: it is only logged."""
    def train(loop: Any) -> float:
        return float(loop.steps * loop.batch_size * TRAIN_FORWARDS)

    pair_nfe = RK45_NFE if cfg.pairs.sampler == "rk45" else cfg.pairs.steps * SOLVER_NFE.get(cfg.pairs.sampler, 1)
    ev = cfg.eval
    student_nfe = (cfg.options.k + 1) if ev.students_at_own_steps else sum(set(ev.student_steps)) * len(STUDENTS)
    eval_nfe = sum(set(ev.teacher_steps)) + (RK45_NFE if ev.teacher_rk45 else 0) + student_nfe
    return {"teacher": train(cfg.teacher) if cfg.teacher_source == SCRATCH else 0.0,
            "pairs": float(cfg.pairs.num_pairs * pair_nfe * (1 if cfg.pairs.guidance == 1 else 2)),
            "four_step": train(cfg.four_step), "one_step": train(cfg.one_step),
            "evaluation": float(ev.num_images * eval_nfe)}


def estimate_remaining(costs: dict[str, float], finished: dict[str, float | None],
                       kinds: dict[str, str] | None = None) -> float | None:
    """Seconds the unfinished stages still need: each one's cost (:func:`stage_costs`) times the seconds per unit
    of cost measured on finished stages of its kind (training or sampling), else on all finished stages.

    ``finished`` maps each finished stage to its seconds in this call, or None when they say nothing of the speed
    (skipped or resumed). None until a stage with work has been timed: before that no honest estimate exists."""
    kinds = STAGE_KIND if kinds is None else kinds
    timed = [s for s, sec in finished.items() if sec is not None and costs.get(s, 0.0) > 0]

    def rate(stages: list[str]) -> float | None:
        units = sum(costs[s] for s in stages)
        return sum(finished[s] or 0.0 for s in stages) / units if units > 0 else None

    overall = rate(timed)
    if overall is None:
        return None
    left = 0.0
    for stage, cost in costs.items():
        if stage not in finished:
            same_kind = rate([s for s in timed if kinds.get(s) == kinds.get(stage)])
            left += cost * (same_kind if same_kind is not None else overall)
    return left


def _duration(seconds: float) -> str:
    """~40 s, ~3 min, ~1.4 h: an estimate's precision, no more."""
    if seconds < 90:
        return f"~{max(5, round(seconds / 5) * 5):.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


class _Overall:
    """The line under each stage's heading: stage N of M, time elapsed and the whole pipeline's time left, estimated
    from the configured work of the remaining stages and the measured speed of the finished ones (the stage times
    the result records; a skipped stage, its work done by an earlier call, tells nothing of the speed)."""

    def __init__(self, cfg: PipelineConfig, console: Console, start: float) -> None:
        self.costs, self.console, self.start = stage_costs(cfg), console, start

    def begin(self, stage: str, result: PipelineResult) -> None:
        done = {s: None if result.outcomes[s].skipped else sec for s, sec in result.stage_seconds.items()
                if s in result.outcomes}
        left = estimate_remaining(self.costs, done)
        when = f"{_duration(left)} left" if left is not None else "time left known after one stage"
        self.console.print(f"pipeline: stage {STAGES.index(stage) + 1}/{len(STAGES)}, "
                           f"{_clock(time.perf_counter() - self.start)} elapsed, {when}", style="dim", highlight=False)


def _register(name: str, outcome: StageOutcome, tags: dict[str, Any]) -> str:
    """Register the stage's logged model, or reuse the version already holding these exact weights."""
    sha = weights_sha256(outcome.generator_dir)
    try:
        for v in tracking.list_versions(name):
            if v.tags.get("generator.sha256") == sha:
                return v.version
    except DistillError:
        pass  # the registered model does not exist yet
    if outcome.model_uri is None:
        raise DistillError(f"{outcome.folder} was trained without tracking, so it has no logged model to register; "
                           "rerun with --track or delete the folder")
    return tracking.register_model(outcome.model_uri, name, tags={**tags, "generator.sha256": sha},
                                   description=version_description(tags, outcome.folder))


def version_description(tags: dict[str, Any], folder: Path, protocol: dict[str, Any] | None = None) -> str:
    """What a registry version is, in one line: role, recipe, steps, where it came from and how it was measured."""
    from distill_common.registry_cli import describe_protocol

    what = f"rf_cifar {tags.get('role')}: {tags.get('recipe')} recipe, {tags.get('steps')} steps"
    measured = f"; FID measured on {describe_protocol(protocol)}" if protocol else ""
    return f"{what}, from {folder}{measured}"


def _promote(name: str, max_steps: int | None) -> str:
    """Move ``champion`` by distill_common.promotion (best FID within the step gate); returns what happened."""
    from distill_common import promotion

    gate = f"best FID at <= {max_steps} steps" if max_steps else "best FID at any step count"
    try:
        decision = promotion.decide(name, "fid", max_steps=max_steps)
    except DistillError as exc:  # e.g. older versions measured under another protocol: never compared
        return f"unchanged: {exc}"
    promotion.apply(decision)
    return f"{gate}; {decision.reason}"


@claims_output_dir(lambda cfg: cfg.folder)
def run_pipeline(cfg: PipelineConfig, *, console: Console | None = None, progress: bool = True) -> PipelineResult:
    """Run (or resume) every stage; see the module docstring."""
    from distill_common.registry_cli import ui_hint
    from distill_rf_cifar.evaluation import registry_tags
    from distill_rf_cifar.training.data import check_training_data

    console = console or Console()
    check_training_data(cfg.data.data_root, cfg.data.source)  # a wrong data root fails now, not after two stages
    if cfg.teacher_source != SCRATCH:
        resolve_generator_folder(cfg.teacher_source)  # a wrong name or path fails before any folder or run exists
    start = time.perf_counter()
    out = cfg.folder
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pipeline_config.yaml")
    result = PipelineResult(out, False, 0.0)
    overall = _Overall(cfg, console, start)
    with tracking.start_run(cfg.experiment, f"pipeline-{cfg.run_name}", config=cfg, tags={"stage": "pipeline"},
                            fallback_dir=out, enabled=cfg.track) as parent:
        console.rule(f"[bold]1/5 teacher[/] ({cfg.teacher_source}) → {out / 'teacher'}")
        overall.begin("teacher", result)
        if cfg.teacher_source == SCRATCH:
            teacher = train_teacher(teacher_config(cfg, out / "teacher"), console=console, progress=progress,
                                    nested=True)
        else:
            teacher = use_teacher(cfg.teacher_source, out / "teacher", experiment=cfg.experiment, track=cfg.track,
                                  console=console, nested=True)
        result.outcomes["teacher"] = teacher
        lap = result.lap("teacher", start)
        if not teacher.finished:
            result.seconds = time.perf_counter() - start
            return result
        console.rule(f"[bold]2/5 pairs[/] → {out / 'pairs'}")
        overall.begin("pairs", result)
        result.outcomes["pairs"] = make_pairs(pairs_config(cfg, teacher.generator_dir, out / "pairs"), console=console,
                                              progress=progress, nested=True)
        lap = result.lap("pairs", lap)
        recipes = student_recipes(cfg)
        for i, label in enumerate(STUDENTS):
            console.rule(f"[bold]{3 + i}/5 student {label}[/] ({recipes[label]}) → {out / 'students' / label}")
            overall.begin(label, result)
            dcfg = distill_config(cfg, recipes[label], teacher.generator_dir, out / "pairs", out / "students" / label)
            dcfg.rounds = RoundsEvalConfig(num_images=0)  # the pipeline's own evaluation scores the final student
            student = distill_student(dcfg, console=console, progress=progress, nested=True)
            result.outcomes[label] = student
            lap = result.lap(label, lap)
            if not student.finished:
                result.seconds = time.perf_counter() - start
                return result

        console.rule(f"[bold]5/5 FID vs NFE and latency[/] → {out / 'eval'}")
        overall.begin("evaluation", result)
        eval_cfg = dataclasses.replace(evaluate_config(cfg), teacher=str(teacher.generator_dir),
                                       students=[f"{r}={result.outcomes[r].generator_dir}" for r in STUDENTS],
                                       output_dir=out / "eval")
        sweep, eval_run = evaluate(eval_cfg, console=console, progress=progress, nested=True)
        result.rows, result.protocol = sweep.rows, sweep.protocol
        result.grid_path, result.plot_paths, result.report_paths = sweep.grid_path, sweep.plot_paths, sweep.report_paths
        lap = result.lap("evaluation", lap)

        if cfg.track and cfg.registry.register:
            names = {"teacher": cfg.registry.teacher_name, **{r: cfg.registry.student_name for r in STUDENTS}}
            for label, name in names.items():
                outcome = result.outcomes[label]
                steps = read_generator_manifest(outcome.generator_dir).get("default_steps")
                tags = {"role": "teacher" if label == "teacher" else "student", "recipe": recipes.get(label, label),
                        "steps": steps, "pipeline.run_name": cfg.run_name, "pipeline.output_dir": str(out.resolve()),
                        "params": outcome.info.get("parameters")}
                version = _register(name, outcome, tags)
                tracking.set_version_tags(name, version, {**registry_tags(sweep.rows, label, sweep.protocol),
                                                          "eval.run_id": eval_run, "recipe": tags["recipe"],
                                                          "steps": steps},
                                          description=version_description(tags, outcome.folder, sweep.protocol))
                result.versions[label] = (name, version)
            for name, gate in ((cfg.registry.student_name, cfg.registry.max_steps), (cfg.registry.teacher_name, None)):
                result.champions[name] = _promote(name, gate)
                champion = tracking.version_by_alias(name, tracking.CHAMPION)
                if champion is not None:
                    result.champion_versions[name] = champion.version
        result.lap("registry", lap)
        result.finished = True
        result.seconds = time.perf_counter() - start
        result.ui_command = ui_hint() if cfg.track else None
        summary = {"finished": True, "seconds": round(result.seconds, 1), "rows": result.rows,
                   "protocol": result.protocol, "versions": result.versions, "champions": result.champions,
                   "stage_seconds": result.stage_seconds,
                   "grid": str(result.grid_path), "plots": [str(p) for p in result.plot_paths],
                   "stages": {k: stage_summary(v) for k, v in result.outcomes.items()}}
        ckpt.write_json(out / "summary.json", summary)
        parent.log_metrics({"pipeline_seconds": result.seconds,
                            **{f"stage_seconds.{k}": v for k, v in result.stage_seconds.items()}})
        parent.log_artifact(out / "summary.json", "pipeline")
        if result.grid_path:
            parent.log_artifact(result.grid_path, "pipeline")
        parent.set_tags({f"registry.{label}": f"{n}/{v}" for label, (n, v) in result.versions.items()})
    print_summary(result, cfg, console)
    return result


def summary_table(result: PipelineResult, cfg: PipelineConfig) -> Table:
    """The main job's table, 80 columns wide: model (with its registry version, ★ the champion), steps, NFE,
    ``FID ±half-width`` of the 95% interval, ms per image, speed-up vs the teacher at its default steps, and the
    verdict of distill_eval.reports (``−9.1% vs teacher@4, disjoint``)."""
    from distill_eval.reports import compact_fid, compact_table, verdict

    protocol = result.protocol or {}
    table = compact_table(f"FID of {protocol.get('generated_n', '?'):,} generated vs "
                          f"{protocol.get('reference_n', '?'):,} {protocol.get('reference_set', '')} images")
    for col, justify in (("model", "left"), ("steps", "right"), ("NFE", "right"), ("FID ±95%", "right"),
                         ("ms/img", "right"), ("speed", "right"), ("verdict", "left")):
        table.add_column(col, justify=justify, no_wrap=True)
    champions = dict(result.champion_versions)
    for r in result.rows:
        name, version = result.versions.get(r["model"], ("", ""))
        model = r["model"] + (f" v{version}" if name else "") + (" ★" if name and champions.get(name) == version else "")
        if r["sampler"] not in ("euler", "consistency"):
            model += f" {r['sampler']}"
        gated = r["role"] == "student" and r["steps"] is not None and r["steps"] <= cfg.registry.max_steps
        table.add_row(model, "-" if r["steps"] is None else str(r["steps"]), f"{r['nfe']:.0f}", compact_fid(r),
                      f"{r['ms_per_image']:.1f}", f"{r['speedup_vs_teacher']:.1f}×", verdict(r, result.rows),
                      style="bold" if gated else None)
    return table


def print_summary(result: PipelineResult, cfg: PipelineConfig, console: Console) -> None:
    """The main job's table (:func:`summary_table`), what its cells mean, the champions, and where everything is."""
    table = summary_table(result, cfg)
    console.print(table)
    base = next((r for r in result.rows if r.get("role") == "teacher" and r.get("speedup_vs_teacher") == 1.0), None)
    console.print(f"FID ±95%: half-width of the bootstrap interval. speed: vs the teacher at "
                  f"{base['steps'] if base else 'its default'} steps. "
                  "verdict: FID change vs the teacher at the same steps; 'disjoint' intervals establish it, 'overlap' "
                  "does not. A CFG step costs 2 NFE.", highlight=False)
    for name, reason in result.champions.items():
        version = result.champion_versions.get(name)
        console.print(f"champion (★) of [bold]{name}[/]: {f'v{version}' if version else 'none'} — {reason}",
                      highlight=False)
    console.print(f"comparison grid: {result.grid_path}", highlight=False)
    for p in result.plot_paths:
        console.print(f"plot: {p}", highlight=False)
    console.print(f"report: {result.report_paths.get('md')}", highlight=False)
    if result.ui_command:
        console.print(f"MLflow UI: {result.ui_command}", highlight=False)
    laps = ", ".join(f"{k} {v:.0f} s" for k, v in result.stage_seconds.items())
    console.print(f"pipeline finished in {result.seconds / 60:.1f} min ({result.folder}){f': {laps}' if laps else ''}",
                  highlight=False)
