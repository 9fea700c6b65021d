"""The stages behind ``distill rf`` commands: train a teacher, make pairs, distil a student, sample, evaluate.

Each stage reads its typed config, does its work through the package's components, logs to MLflow through
distill_common.tracking (the only place mlflow is touched) and records what it produced in ``stage.json``
in its output folder, so a rerun skips finished work and resumes unfinished work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from distill_common import checkpoint as ckpt
from distill_common import tracking
from distill_common.config import to_dict
from distill_common.errors import ConfigError, DataError
from distill_common.generator import resolve_generator_folder
from distill_common.output_dir import claims_output_dir
from distill_common.runtime import environment_info, is_main_process
from distill_rf_cifar.config import (
    DistillConfig,
    EvaluateConfig,
    FlowConfig,
    LoopConfig,
    PairsConfig,
    RecipeConfig,
    SampleConfig,
    TeacherConfig,
)
from distill_rf_cifar.generator import RFGenerator, load_model, save_generator, weights_sha256
from distill_rf_cifar.models.unet import build_unet, count_parameters
from distill_rf_cifar.recipes import Phase, build_recipe, recipe_data_kinds, run_recipe
from distill_rf_cifar.training.loop import TrainingCallback

STAGE_FILE = "stage.json"
GENERATOR_DIR = "generator"
# Loop options that do not change the trained weights (a rerun with other values resumes the same run).
_NON_SEMANTIC = {"stop_at_step", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                 "log_checkpoints", "device", "precision"}


@dataclass
class StageOutcome:
    name: str
    folder: Path
    finished: bool
    generator_dir: Path | None = None
    model_uri: str | None = None
    run_id: str | None = None
    skipped: bool = False
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class TrackingCallback(TrainingCallback):
    """Training reports -> MLflow: metrics under ``train/``, sample grids, checkpoint weights as artifacts."""

    def __init__(self, run: tracking.TrackingRun, samples_dir: Path, log_checkpoints: bool = True) -> None:
        self.run, self.samples_dir, self.log_checkpoints = run, samples_dir, log_checkpoints

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def on_samples(self, step: int, images: torch.Tensor) -> None:
        from distill_eval.grids import image_grid

        grid = image_grid(images, ncols=10)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        grid.save(self.samples_dir / f"step_{step:07d}.png")
        self.run.log_image(grid, f"samples/step_{step:07d}.png")

    def on_checkpoint(self, step: int, folder: Path) -> None:
        if self.log_checkpoints:
            for name in ("model.safetensors", "ema.safetensors"):
                self.run.log_artifact(folder / name, f"checkpoints/{folder.name}")


def config_hash(cfg: Any) -> str:
    """Hash of the options that determine the trained weights (loop bookkeeping and devices excluded)."""

    def strip(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items()
                    if k not in _NON_SEMANTIC | {"data_root", "track", "experiment", "run_name", "output_dir", "rounds"}}
        return d

    return hashlib.sha256(json.dumps(strip(to_dict(cfg)), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_stage(folder: Path) -> dict[str, Any]:
    path = folder / STAGE_FILE
    if not path.is_file():
        return {}
    try:
        stage = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        stage = None
    if not isinstance(stage, dict):
        raise DataError(f"{path} is corrupt (not a JSON object); delete it to retrain this stage from its last "
                        f"checkpoint, or pass another --output-dir")
    return stage


def _check_same_config(folder: Path, stage: dict[str, Any], digest: str, what: str) -> None:
    if stage.get("config_hash") not in (None, digest):
        raise ConfigError(f"{folder} holds a {what} trained with other options (config hash {stage['config_hash']} vs "
                          f"{digest}); pass a new --output-dir or delete {folder}")


def _samples_fn(num_classes: int) -> Any:
    """A SampleFn per phase: 2 images per class (seeds 0..19) at the phase's step count and guidance."""

    def for_phase(phase: Phase):
        labels = [i % max(num_classes, 1) for i in range(2 * max(num_classes, 1))]

        def sample(model: torch.nn.Module) -> torch.Tensor:
            gen = RFGenerator(model, default_steps=phase.sample_steps, default_guidance=phase.guidance,
                              sampler=phase.sampler)
            return gen.generate(labels, seeds=list(range(len(labels))))

        return sample

    return for_phase


def _train_recipe(name: str, phases: list[Phase], model: torch.nn.Module, loop: LoopConfig, data: dict[str, Any],
                  folder: Path, cfg: Any, run_name: str, tags: dict[str, Any], export: dict[str, Any],
                  progress: bool, console: Console, nested: bool = False) -> StageOutcome:
    """Shared by teacher and students: run the recipe under an MLflow run, export and log the generator."""
    start = time.perf_counter()
    stage = _read_stage(folder)
    gen_dir = folder / GENERATOR_DIR
    digest = config_hash(cfg)
    _check_same_config(folder, stage, digest, name)
    if stage.get("finished") and (gen_dir / "generator.json").is_file():
        console.print(f"[green]✓[/] {name}: already trained ({gen_dir}); skipping")
        return StageOutcome(name, folder, True, gen_dir, stage.get("model_uri"), stage.get("run_id"), skipped=True,
                            info=stage.get("info", {}))
    tags = {**tags, "config_hash": digest}
    if stage.get("run_id"):
        tags["resumes_run"] = stage["run_id"]  # an earlier, unfinished run of this folder
    with tracking.start_run(cfg.experiment, run_name, config=cfg, tags=tags, fallback_dir=folder,
                            enabled=cfg.track, nested=nested) as run:
        main = is_main_process()  # under `accelerate launch`, only rank 0 writes files and logs
        if main:
            ckpt.write_json(folder / STAGE_FILE, {"config_hash": digest, "run_id": run.run_id, "finished": False})
        params = count_parameters(model)
        run.log_params({"model.parameters": params, "model.megabytes_fp32": round(params * 4 / 1e6, 2),
                        "phases": ",".join(f"{p.name}:{p.steps}" for p in phases)})
        callback = TrackingCallback(run, folder / "samples", loop.log_checkpoints)
        result = run_recipe(phases, model, loop, data, folder, callback=callback,
                            sample_fn=_samples_fn(model.num_classes), progress=progress)
        info = {"parameters": params, "steps": sum(p.steps for p in phases),
                "steps_per_second": [round(r.steps_per_second, 3) for r in result.results],
                "train_seconds": round(time.perf_counter() - start, 2)}
        if not main:
            return StageOutcome(name, folder, result.finished, info=info)
        if not result.finished:
            console.print(f"[yellow]{name}: stopped at --stop-at-step {loop.stop_at_step}; rerun to resume[/]")
            return StageOutcome(name, folder, False, run_id=run.run_id, seconds=time.perf_counter() - start, info=info)
        save_generator(gen_dir, result.model, **{**export, **phases[-1].export})
        model_uri = tracking.log_generator_model(run, gen_dir) if run.enabled else None
        run.set_tags({"generator.sha256": weights_sha256(gen_dir)})
        if len(phases) > 1:  # every phase's model (e.g. each progressive round) as a generator of its own
            info["phase_generators"] = export_phase_generators(phases, result.model, folder, export, run)
        ckpt.write_json(folder / STAGE_FILE, {"config_hash": digest, "run_id": run.run_id, "finished": True,
                                              "model_uri": model_uri, "generator": str(gen_dir), "info": info})
    return StageOutcome(name, folder, True, gen_dir, model_uri, run.run_id, seconds=time.perf_counter() - start,
                        info=info)


def export_phase_generators(phases: list[Phase], model: torch.nn.Module, folder: Path, export: dict[str, Any],
                            run: tracking.TrackingRun | None = None) -> dict[str, dict[str, Any]]:
    """``<folder>/<phase>/generator`` from each finished phase's EMA weights (``<phase>/final``), sampling with that
    phase's step count (and grid); logged as MLflow models ``<phase>-generator`` when ``run`` tracks."""
    import copy

    from distill_rf_cifar.recipes import FINAL
    from distill_rf_cifar.training.loop import MODEL_FILE

    out = {}
    for phase in phases:
        gen_dir = folder / phase.name / GENERATOR_DIR
        weights = folder / phase.name / FINAL / MODEL_FILE
        if not weights.is_file():
            continue
        phase_model = copy.deepcopy(model)
        ckpt.load_into(phase_model, weights, f"{phase.name} weights")
        save_generator(gen_dir, phase_model, **{**export, "default_steps": phase.sample_steps, "sampler": phase.sampler,
                                                "phase": phase.name, **phase.export})
        uri = tracking.log_generator_model(run, gen_dir, name=f"{phase.name}-generator") if run and run.enabled else None
        out[phase.name] = {"generator": str(gen_dir), "steps": phase.sample_steps, "model_uri": uri}
    return out


@claims_output_dir(lambda cfg: cfg.output_dir)
def train_teacher(cfg: TeacherConfig, *, console: Console | None = None, progress: bool = True,
                  nested: bool = False) -> StageOutcome:
    """Rectified-flow teacher on CIFAR-10 (recipe ``teacher``) from random weights, or warm-started from a generator
    (``--init reference``: the shipped teacher); resumes from the run folder's checkpoints (full state)."""
    from distill_rf_cifar.training.data import load_cifar_training_data

    console = console or Console()
    folder = Path(cfg.output_dir)
    init_info: dict[str, Any] = {}
    if cfg.init != "scratch":  # warm start: the generator's architecture and weights (a checkpoint still wins)
        init_dir = resolve_generator_folder(cfg.init)
        init_model = load_model(init_dir)
        if init_model.guidance_conditioned:
            raise ConfigError(f"--init {cfg.init} is a guidance-conditioned student; warm-start a teacher from a "
                              "teacher generator ('reference' or a folder written by train-teacher)")
        from distill_common.generator import read_generator_manifest

        manifest = read_generator_manifest(init_dir)
        cfg = dataclasses.replace(cfg, model=init_model.config)
        prior = manifest.get("total_train_steps", manifest.get("train_steps"))
        seen = manifest.get("images_seen")  # recorded by warm-started teachers; unknown for older generators
        init_info = {"init": cfg.init, "init_sha256": weights_sha256(init_dir), "init_train_steps": prior,
                     "total_train_steps": None if prior is None else int(prior) + cfg.train.steps,
                     "images_seen": None if seen is None else int(seen) + cfg.train.steps * cfg.train.batch_size}
        console.print(f"teacher: warm start from {cfg.init} ({init_dir}, {prior} steps so far)", highlight=False)
    torch.manual_seed(cfg.train.seed)  # the initial weights
    model = build_unet(cfg.model)
    if cfg.init != "scratch":
        model.load_state_dict(init_model.state_dict())
    phases = build_recipe("teacher", RecipeConfig(), cfg.flow, cfg.train.steps, teacher_steps=cfg.sampling.steps,
                          guidance=cfg.sampling.guidance)
    stage = _read_stage(folder)
    data = {}
    if not stage.get("finished"):
        data["images"] = load_cifar_training_data(cfg.data.resolved_root(), cfg.data.source, cfg.data.limit,
                                                  cfg.data.random_flip, show_progress=progress,
                                                      strict=cfg.data.strict)
    export = dict(role="teacher", default_steps=cfg.sampling.steps, default_guidance=cfg.sampling.guidance,
                  sampler=cfg.sampling.sampler, rtol=cfg.sampling.rtol, atol=cfg.sampling.atol, recipe="teacher",
                  time_sampler=cfg.flow.time_sampler, label_dropout=cfg.flow.label_dropout, train_steps=cfg.train.steps,
                  train_batch_size=cfg.train.batch_size,
                  **(init_info or {"images_seen": cfg.train.steps * cfg.train.batch_size}))
    return _train_recipe("teacher", phases, model, cfg.train, data, folder, cfg, cfg.run_name,
                         {"stage": "train-teacher", "recipe": "teacher"}, export, progress, console, nested)


def use_teacher(source: str | Path, folder: Path, *, experiment: str = "rf_cifar", track: bool = True,
                console: Console | None = None, nested: bool = False) -> StageOutcome:
    """An existing teacher (the shipped ``reference``, a generator folder or a URI) as a pipeline's teacher stage.

    Nothing is trained: the generator is logged as a pyfunc model under an MLflow run, so it is registered and
    served like a trained one; a rerun with the same weights reuses that run.
    """
    from distill_common.generator import read_generator_manifest

    console = console or Console()
    gen_dir = resolve_generator_folder(source)
    sha = weights_sha256(gen_dir)
    manifest = read_generator_manifest(gen_dir)
    info = {"parameters": manifest.get("parameters"), "source": str(source), "steps": manifest.get("train_steps")}
    stage = _read_stage(folder)
    if stage.get("finished") and stage.get("teacher_sha256") == sha:
        console.print(f"[green]✓[/] teacher: {source} ({gen_dir}) already logged; reusing")
        return StageOutcome("teacher", folder, True, gen_dir, stage.get("model_uri"), stage.get("run_id"),
                            skipped=True, info=info)
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with tracking.start_run(experiment, f"teacher-{Path(str(source)).name}", tags={"stage": "use-teacher",
                            "teacher.source": str(source), "generator.sha256": sha}, fallback_dir=folder,
                            enabled=track, nested=nested) as run:
        model_uri = tracking.log_generator_model(run, gen_dir) if run.enabled else None
        if is_main_process():
            ckpt.write_json(folder / STAGE_FILE, {"run_id": run.run_id, "finished": True, "model_uri": model_uri,
                                                  "generator": str(gen_dir), "teacher_sha256": sha, "info": info})
    console.print(f"teacher: {source} → {gen_dir} (sha256 {sha[:12]}…)", highlight=False)
    return StageOutcome("teacher", folder, True, gen_dir, model_uri, run.run_id, seconds=time.perf_counter() - start,
                        info=info)


@claims_output_dir(lambda cfg: cfg.output_dir)
def make_pairs(cfg: PairsConfig, *, console: Console | None = None, progress: bool = True,
               run_name: str = "make-pairs", nested: bool = False) -> StageOutcome:
    """Teacher ODE pairs into resumable shards (see pairs.py)."""
    from distill_rf_cifar.pairs import MANIFEST
    from distill_rf_cifar.pairs import make_pairs as generate

    console = console or Console()
    start = time.perf_counter()
    folder = Path(cfg.output_dir)
    with tracking.start_run(cfg.experiment, run_name, config=cfg, tags={"stage": "make-pairs"}, fallback_dir=folder,
                            enabled=cfg.track, nested=nested) as run:
        result = generate(cfg, progress=progress)
        seconds = time.perf_counter() - start
        run.log_metrics({"pairs": result.manifest["num_pairs"], "shards_generated": result.generated_shards,
                         "seconds": seconds})
        run.set_tags({"teacher.sha256": result.manifest["teacher_sha256"]})
        run.log_artifact(folder / MANIFEST, "pairs")
    if result.generated_shards == 0:
        console.print(f"[green]✓[/] pairs: all {result.manifest['num_pairs']} already in {folder}; nothing to do")
    return StageOutcome("pairs", folder, True, run_id=run.run_id, skipped=result.generated_shards == 0,
                        seconds=seconds, info={"num_pairs": result.manifest["num_pairs"],
                                               "shards_generated": result.generated_shards})


@claims_output_dir(lambda cfg: cfg.folder)
def distill_student(cfg: DistillConfig, *, console: Console | None = None, progress: bool = True,
                    nested: bool = False) -> StageOutcome:
    """A student from the teacher's weights by recipe ``cfg.recipe`` (see recipes.py)."""
    from distill_rf_cifar.generator import load_generator
    from distill_rf_cifar.pairs import check_teacher, load_pairs
    from distill_rf_cifar.training.data import load_cifar_training_data

    console = console or Console()
    cfg = dataclasses.replace(cfg, teacher=resolve_generator_folder(cfg.teacher))  # a name such as 'reference'
    folder = cfg.folder
    teacher = load_generator(cfg.teacher, device="cpu")
    if cfg.recipe == "guided" and teacher.info.get("guidance_conditioned"):  # refused before the folder is written
        raise ConfigError(f"--teacher {cfg.teacher} already takes the guidance scale w as an input (a guided "
                          "student); the guided recipe distils a CFG teacher: pass a plain rf teacher, e.g. reference")
    guidance = teacher.default_guidance if cfg.options.target_guidance is None else cfg.options.target_guidance
    phases = build_recipe(cfg.recipe, cfg.options, FlowConfig(), cfg.train.steps,
                          teacher_steps=teacher.default_steps, guidance=guidance)
    kinds = recipe_data_kinds(phases)
    manifest = check_teacher(cfg.pairs, cfg.teacher) if "pairs" in kinds else None  # refuse before any work
    stage = _read_stage(folder)
    data: dict[str, Any] = {}
    if not stage.get("finished"):
        if "pairs" in kinds:
            data["pairs"] = load_pairs(cfg.pairs, cfg.teacher)  # each shard's teacher hash checked too
        if "images" in kinds:
            data["images"] = load_cifar_training_data(cfg.data.resolved_root(), cfg.data.source, cfg.data.limit,
                                                      cfg.data.random_flip, show_progress=progress,
                                                      strict=cfg.data.strict)
    model = load_model(cfg.teacher)  # every student starts from the teacher's weights
    export = dict(role=cfg.recipe, default_steps=phases[-1].sample_steps, default_guidance=1.0,
                  sampler=phases[-1].sampler,
                  recipe=cfg.recipe, teacher_sha256=weights_sha256(cfg.teacher), teacher=str(Path(cfg.teacher).resolve()),
                  # the CFG scale the student's targets carry: the pairs' (baked in) or the teacher's own
                  teacher_guidance=float(manifest["guidance"]) if manifest else guidance,
                  train_steps=cfg.train.steps,
                  pairs_teacher_sha256=manifest["teacher_sha256"] if manifest else None)
    tags = {"stage": "distill", "recipe": cfg.recipe, "teacher.sha256": export["teacher_sha256"]}
    outcome = _train_recipe(cfg.recipe, phases, model, cfg.train, data, folder, cfg,
                            cfg.run_name or f"distill-{cfg.recipe}", tags, export, progress, console, nested)
    if cfg.recipe == "progressive" and outcome.finished and cfg.rounds.num_images > 0 and is_main_process():
        outcome.info["rounds"] = evaluate_rounds(cfg, phases, console=console, progress=progress, nested=nested)
    return outcome


def evaluate_rounds(cfg: DistillConfig, phases: list[Phase], *, console: Console,
                    progress: bool = True, nested: bool = False) -> dict[str, Any]:
    """Progressive distillation round by round (Salimans & Ho 2022, Fig. 4): FID of each round's student at its own
    step count and of the teacher at the same Euler steps, on one protocol; ``rounds.{md,csv,json}``,
    ``plots/fid_vs_nfe.png`` (one line per model) and the sweep's grid under ``<run>/rounds``, logged to MLflow."""
    from distill_common.generator import load_generator
    from distill_eval.reports import cell, print_table, write_report
    from distill_rf_cifar.config import EvalConfig
    from distill_rf_cifar.evaluation import SweepEntry, run_sweep

    folder, r = cfg.folder, cfg.rounds
    out = folder / "rounds"
    teacher_gen = load_generator(cfg.teacher, device=cfg.train.device)
    dirs = {p.name: folder / p.name / GENERATOR_DIR for p in phases}
    if len(phases) == 1:  # one round: the recipe's own generator is that round's
        dirs[phases[0].name] = folder / GENERATOR_DIR
    students = [(p, load_generator(dirs[p.name], device=cfg.train.device)) for p in phases]
    steps = sorted({p.sample_steps for p in phases})
    entries = [SweepEntry("teacher", "teacher", teacher_gen, "euler", s)
               for s in sorted({teacher_gen.default_steps, *(steps if r.teacher else [])})]
    entries += [SweepEntry("progressive", "student", g, "euler", p.sample_steps) for p, g in students]
    eval_cfg = EvalConfig(teacher_steps=steps, teacher_rk45=False, student_steps=[], num_images=r.num_images,
                          reference=r.reference, reference_n=r.reference_n, batch_size=r.batch_size,
                          feature_precision=r.feature_precision, sample_precision=cfg.train.precision if cfg.train.precision in ("fp32", "bf16") else "auto")
    with tracking.start_run(cfg.experiment, f"{cfg.run_name or 'distill-progressive'}-rounds", config=cfg,
                            tags={"stage": "progressive-rounds", "recipe": "progressive"}, fallback_dir=out,
                            enabled=cfg.track, nested=nested) as run:
        sweep = run_sweep(("teacher", teacher_gen), [], eval_cfg, out, data_root=cfg.data.resolved_root(),
                          console=console, progress=progress, entries=entries)
        by_key = {row["key"]: row for row in sweep.rows}
        rows = []
        for i, (p, _) in enumerate(students):
            row = by_key[f"progressive_s{p.sample_steps}"]
            t_row = by_key.get(f"teacher_s{p.sample_steps}", {})
            rows.append({"round": i + 1, "teacher_steps": p.export.get("teacher_steps"), "steps": p.sample_steps,
                         "nfe": row["nfe"], "fid": row["fid"], "fid_ci95_low": row.get("fid_ci95_low"),
                         "fid_ci95_high": row.get("fid_ci95_high"), "teacher_fid_same_steps": t_row.get("fid"),
                         "teacher_ci95_low": t_row.get("fid_ci95_low"), "teacher_ci95_high": t_row.get("fid_ci95_high"),
                         "teacher_same_steps": cell(t_row, "fid") if t_row else None,  # "FID [low, high]"
                         "ms_per_image": row["ms_per_image"], "generator": str(dirs[p.name])})
            run.log_metrics({"round.fid": row["fid"], "round.steps": p.sample_steps,
                             **({"round.teacher_fid": t_row["fid"]} if t_row else {})}, step=i + 1)
        columns = ["round", "teacher_steps", "steps", "nfe", "fid", "teacher_same_steps", "ms_per_image", "generator"]
        report = write_report(rows, out, "rounds", columns=columns,
                              meta={"protocol": sweep.protocol, "teacher": str(cfg.teacher), "images": r.num_images})
        for path in [*report.values(), *sweep.report_paths.values(), sweep.grid_path, *sweep.plot_paths]:
            run.log_artifact(path, "rounds")
    print_table(rows, ["round", "teacher_steps", "steps", "nfe", "fid", "teacher_same_steps", "ms_per_image"],
                title=f"progressive distillation round by round (FID, {sweep.protocol['generated_n']} images vs "
                      f"{sweep.protocol['reference_n']} {sweep.protocol['reference_set']})", console=console)
    console.print(f"plot: {sweep.plot_paths[0]}\ntable: {report.get('md')}", highlight=False)
    return {"rows": rows, "plot": str(sweep.plot_paths[0]), "report": str(report.get("md")), "run_id": run.run_id}


@claims_output_dir(lambda cfg: cfg.output_dir)
def sample(cfg: SampleConfig, *, console: Console | None = None, progress: bool = True) -> Path:
    """PNG per image (``class{c}_seed{s}.png``) and ``grid.png``: one row per class, labelled with the class name,
    one column per seed, 64 px tiles."""
    from PIL import Image
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from distill_common.data.cifar10 import CIFAR10_CLASSES
    from distill_common.generator import load_generator
    from distill_eval.grids import comparison_grid

    console = console or Console()
    with tracking.using_store(cfg.tracking_uri):  # where a models:/ or runs:/ --generator is read from
        gen = load_generator(cfg.generator, device=cfg.device, precision=cfg.precision)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    conditions = [c for c in cfg.classes for _ in range(cfg.per_class)]
    seeds = [cfg.seed + j for _ in cfg.classes for j in range(cfg.per_class)]
    kwargs = {"sampler": cfg.sampler} if cfg.sampler else {}
    steps = cfg.steps if cfg.steps is not None else gen.default_steps  # steps >= 1 is checked by the config
    start, batch, chunks = time.perf_counter(), max(cfg.per_class, 16), []
    columns = (TextColumn(f"sampling {steps} steps"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("sample", total=len(conditions))
        for i in range(0, len(conditions), batch):  # every image has its own seed: batching changes nothing
            chunks.append(gen.generate(conditions[i:i + batch], steps, seeds[i:i + batch], cfg.guidance, **kwargs))
            bar.advance(task, len(chunks[-1]))
    images = torch.cat(chunks)  # (N, 3, 32, 32)
    for img, c, s in zip(images, conditions, seeds, strict=True):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        ckpt.save_image(Image.fromarray(arr), out / f"class{c}_seed{s}.png")
    names = [CIFAR10_CLASSES[c] if gen.num_classes == 10 and c < 10 else f"class {c}" for c in cfg.classes]
    guidance = cfg.guidance if cfg.guidance is not None else gen.default_guidance
    grid_columns = [(f"seed {cfg.seed + j}", images[j::cfg.per_class]) for j in range(cfg.per_class)]
    comparison_grid(grid_columns, names, out / "grid.png", cell_size=64,
                    title=f"{cfg.generator}: {steps} steps, guidance {guidance:g}")
    console.print(f"wrote {len(conditions)} images and {out / 'grid.png'} in {time.perf_counter() - start:.0f} s "
                  f"({steps} steps, NFE {getattr(gen, 'last_nfe', '?')}, {gen.precision})", highlight=False)
    return out / "grid.png"


@claims_output_dir(lambda cfg: cfg.output_dir)
def evaluate(cfg: EvaluateConfig, *, console: Console | None = None, progress: bool = True,
             run_name: str = "evaluate", nested: bool = False) -> tuple[Any, str | None]:
    """FID-vs-NFE sweep of a teacher and students; logs an MLflow run and stamps evaluated registry versions."""
    from distill_common.generator import load_generator
    from distill_rf_cifar.evaluation import registry_tags, run_sweep

    console = console or Console()
    teacher = ("teacher", load_generator(cfg.teacher, device=cfg.device))
    students = []
    for spec in cfg.students:
        if "=" not in spec:
            raise ConfigError(f"student {spec!r} has no label; pass LABEL=FOLDER_OR_URI (e.g. four_step=runs/.../generator)")
        label, src = spec.split("=", 1)
        students.append((label, load_generator(src, device=cfg.device)))
    out = Path(cfg.output_dir)
    with tracking.start_run(cfg.experiment, run_name, config=cfg, tags={"stage": "evaluate"}, fallback_dir=out,
                            enabled=cfg.track, nested=nested) as run:
        result = run_sweep(teacher, students, cfg.eval, out, data_root=cfg.data_root, console=console, progress=progress)
        for r in result.rows:
            run.log_metrics({f"{r['key']}.{k}": r[k] for k in ("fid", "fid_ci95_low", "fid_ci95_high", "kid", "kid_std",
                                                               "nfe", "ms_per_image", "speedup_vs_teacher") if k in r})
        run.set_tags({f"protocol.{k}": v for k, v in result.protocol.items()} | {"env.device_name": environment_info()["device_name"]})
        for p in result.report_paths.values():  # the same artifact folders as `distill eval benchmark`
            run.log_artifact(p, "report")
        run.log_artifact(result.grid_path, "grids")
        for p in result.plot_paths:
            run.log_artifact(p, "plots")
        for label, src in [("teacher", cfg.teacher), *[s.split("=", 1) for s in cfg.students]]:
            if src.startswith("models:/"):
                name, version = tracking.resolve_model_version(src)
                if name:
                    tracking.set_version_tags(name, version, {**registry_tags(result.rows, label, result.protocol),
                                                              "eval.run_id": run.run_id})
    return result, run.run_id


def stage_summary(outcome: StageOutcome) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(outcome).items()}
