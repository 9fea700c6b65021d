"""``distill prune compare``: the seed's four pipelines (V1, V2.1, V2.2, V3) and a random-init row, distilled from
one teacher under one optimiser-step budget, scored with the teacher on one protocol, in one table.

Each row is a ``distill prune train`` run of its recipe (``training/recipes.py``) through the one training loop,
with its own schedule: V1's progressive DDPM chain (Salimans & Ho 2022) with feature KD and EMA, V2.1's
OneCycleLR (Smith & Topin 2019) with teacher-to-student slicing, V2.2's output KD with a decaying alpha(t) and
growing caption dropout, V3's BK-SDM block removal (Kim et al. 2023) with feature KD; the ``random`` row trains
``--random-recipe`` (V2.1 by default) from diffusers' random initialisation, which isolates the teacher-weight
initialisation. Training data is the teacher's own: CIFAR-10 train images captioned with its training templates
(``--data-source cifar10``).

Scoring (``evaluation/scoring.py``): every model, the teacher included, draws N images for the held-out caption
templates at seeds ``seed..seed+N-1`` under two sampling settings (the recipes' 25 DDPM steps at CFG 5 and the
teacher's), scored for FID with its 95% interval against the CIFAR-10 train images, class accuracy with its
Wilson interval, LPIPS to the teacher's image at the same seed and setting, milliseconds per image, and the
UNet's parameters and MACs. The students are registered and the lowest-FID one goes through the promotion gate
(``distill_common.promotion``: it must beat the champion by non-overlapping intervals).

Resumable: finished students (``students/ROW/done.json``), images (PNG per seed) and scores
(``scores/SETTING-MODEL.json``) are kept, a killed training resumes from its checkpoint, and a rerun with other
options on the same folder is refused. The output folder is locked while a comparison runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_common.config import option, to_dict
from distill_common.errors import ConfigError
from distill_common.runtime import DEVICES
from distill_eval.protocol import FEATURE_PRECISIONS
from distill_sd_prune.sampling.pipeline import HEADLINE_GUIDANCE, HEADLINE_STEPS, SAMPLERS
from distill_sd_prune.training.config import RECIPES, TrainConfig

ROWS = ("v1", "v2.1", "v2.2", "v3", "random", "v1-tiny", "v1-tiny-dropout", "v1-tiny-long")
# Rows that are a recipe on another student: V1's recipe on BK-SDM-Tiny's block plan, narrowed (``--v1-tiny-width``),
# the same with caption dropout (``--v1-tiny-dropout``), so that KD also distils the unconditional branch, and that
# student at a longer budget (``--v1-tiny-long-steps``): the one row outside the table's one budget.
PLANNED_ROWS = {"v1-tiny": ("v1", "sd_tiny", False), "v1-tiny-dropout": ("v1", "sd_tiny", True),
                "v1-tiny-long": ("v1", "sd_tiny", True)}
LONG_ROW = "v1-tiny-long"
TABLE_ROWS = tuple(r for r in ROWS if r != LONG_ROW)  # the rows of the one budget
V3_PLANS = ("sd_small", "bk_small", "sd_tiny")
TEACHER = "teacher"
CONFIG_FILE = "compare_config.json"
STATE_FILE = "compare_state.json"
REPORT = "comparison"
# Options that may change between a run and its resumption (they do not change any number).
RESUMABLE_FIELDS = ("output_dir", "device", "track", "promote", "experiment", "registered_name", "min_improvement")
# Options that may grow between a run and its resumption: a rerun with more rows trains and scores only the new ones.
EXTENDABLE_FIELDS = ("rows",)
# The goal: <= 50% of the teacher's UNet parameters, FID <= 1.3x the teacher's, class accuracy >= 90%.
GOAL_PARAMS, GOAL_FID, GOAL_ACCURACY = 0.5, 1.3, 0.9


@dataclass
class CompareConfig:
    """Options of ``distill prune compare``."""

    teacher_model: str = option(
        "reference",
        "Teacher (--base-model): 'reference' (the shipped CIFAR-sized SD) or a diffusers folder of that kind.",
        aliases=("--base-model",),
    )
    output_dir: Path = option(Path("runs/prune/compare"), "Students, images, scores, the table and the grid.")
    rows: list[str] = option(list(TABLE_ROWS), "Students to train and compare (default: every row of the one budget; "
                             "add v1-tiny-long for the longer one); the folder's other finished rows stay in its table.",
                             choices=ROWS)
    random_recipe: str = option("v2.1", "Recipe of the random-init row (its plan, width and schedules).",
                                choices=RECIPES)
    v3_plan: str = option("sd_small", "Block plan of the V3 row.", choices=V3_PLANS)
    v1_tiny_width: float = option(0.75, "Channel width of the v1-tiny row (V1's recipe on the sd_tiny plan).",
                                  gt=0, le=1)
    v1_tiny_dropout: float = option(
        0.1, "Caption dropout of the v1-tiny-dropout row: the share of captions replaced by the empty prompt, so "
        "output and feature KD also distil the teacher's unconditional prediction that CFG samples with.", gt=0, le=1)
    v1_tiny_long_steps: int | None = option(
        None, "Optimiser steps of the v1-tiny-long row (v1-tiny-dropout trained longer; default: twice --max-steps), "
        "the one row outside the table's one budget.", ge=1)
    max_steps: int = option(2000, "The one optimiser-step budget of every student (v1-tiny-long: its own).", ge=1)
    batch_size: int = option(64, "Micro-batch size of every student (V3 accumulates 4 per step).", ge=1)
    data_root: Path | None = option(None, "Data root holding cifar10/ (default: $DISTILL_DATA_ROOT).")
    data_limit: int | None = option(None, "Train on the first N CIFAR-10 train images only.", ge=1)
    data_cache: bool = option(True, "Cache the teacher VAE's latents and the captions' embeddings once.")
    checkpoint_every: int = option(250, "Checkpoint every N steps (a killed comparison resumes there).", ge=1)
    eval_every: int = option(500, "Periodic FID/LPIPS of the recipes that have it (V2.x) every N steps (0: off).",
                             ge=0)
    eval_num_images: int = option(200, "Images per periodic evaluation (the scoring protocol at a smaller N).",
                                  ge=2)
    num_images: int = option(2000, "Images per model and sampling setting.", ge=2)
    reference: str = option("cifar10-train", "FID reference set.", choices=("cifar10-train", "cifar10-test"))
    reference_n: int = option(10_000, "Reference images (the first N of the set).", ge=2)
    recipe_steps: int = option(HEADLINE_STEPS, "The recipes' sampling: steps.", ge=1)
    recipe_guidance: float = option(HEADLINE_GUIDANCE, "The recipes' sampling: CFG scale.", ge=0)
    recipe_sampler: str = option("ddpm", "The recipes' sampling: sampler.", choices=tuple(SAMPLERS))
    teacher_steps: int = option(30, "The teacher's sampling: steps (the reference model card's best setting).",
                                ge=1)
    teacher_guidance: float = option(4.0, "The teacher's sampling: CFG scale (the reference model card's best "
                                     "setting).", ge=0)
    teacher_sampler: str = option("euler", "The teacher's sampling: sampler (the reference model card's best "
                                  "setting).", choices=tuple(SAMPLERS))
    classifier: str = option("reference", "CIFAR-10 classifier of class accuracy: 'reference' (shipped), a folder "
                             "written by distill_eval.classifier.save_classifier, or none.")
    lpips_net: str = option("alex", "LPIPS backbone.", choices=("alex", "vgg"))
    feature_precision: str = option("fp32", "Inception forward precision (part of the FID protocol); +compile: under "
                                    "torch.compile, 1.34x.", choices=FEATURE_PRECISIONS)
    bootstrap_resamples: int = option(200, "Bootstrap resamples of each FID's 95% interval.", ge=2)
    eval_batch_size: int = option(64, "Generation, scoring and timing batch size.", ge=1)
    timing_repeats: int = option(3, "Timed batches per model and setting (after one warm-up).", ge=1)
    grid_rows: int = option(10, "Prompts (rows) in the teacher-vs-students grid.", ge=1)
    seed: int = option(0, "Seed of training and of the first image.")
    device: str = option("auto", "Device.", choices=DEVICES)
    experiment: str = option("sd_student_prune-compare", "MLflow experiment of the trainings and the comparison.")
    track: bool = option(True, "Log to MLflow (needed to register and promote).")
    promote: bool = option(True, "Register the students and promote the winner through the promotion gate.")
    registered_name: str = option("sd_student_prune_reference", "Registered model of the students (one protocol).")
    min_improvement: float = option(0.0, "Promotion gate: FID gain needed beyond non-overlapping intervals.", ge=0)

    def validate(self) -> None:
        if not self.rows:
            raise ConfigError(f"nothing to compare; pass --rows with some of: {', '.join(ROWS)}")
        if len(set(self.rows)) != len(self.rows):
            raise ConfigError(f"--rows names a row twice ({', '.join(self.rows)}); name each once")
        if self.promote and not self.track:
            raise ConfigError("--promote needs MLflow tracking; pass --no-promote with --no-track")
        for row in self.rows:
            row_train_config(self, row)  # every row's recipe resolves and validates


def row_recipe(cfg: CompareConfig, row: str) -> tuple[str, str | None]:
    """(recipe, init override) of a row."""
    if row not in ROWS:
        from distill_common.errors import unknown_choice

        raise unknown_choice("comparison row", row, ROWS)
    if row in PLANNED_ROWS:
        return PLANNED_ROWS[row][0], None
    return (cfg.random_recipe, "random") if row == "random" else (row, None)


def long_row_steps(cfg: CompareConfig) -> int:
    """The v1-tiny-long row's budget: ``--v1-tiny-long-steps``, or twice the table's one budget."""
    return cfg.v1_tiny_long_steps or 2 * cfg.max_steps


def row_done_path(cfg: CompareConfig, row: str) -> Path:
    """``students/ROW/done.json``: written when the row's training finished (the row's folder is its training's)."""
    return Path(cfg.output_dir) / "students" / row / "done.json"


def row_train_config(cfg: CompareConfig, row: str) -> TrainConfig:
    """The ``distill prune train`` options of one row: its recipe, the shared budget and data, resolved."""
    from distill_sd_prune.training.recipes import recipe_values

    recipe, init = row_recipe(cfg, row)
    t = TrainConfig(
        recipe=recipe,
        teacher_model=cfg.teacher_model,
        output_dir=row_done_path(cfg, row).parent,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=cfg.device,
        checkpoint_every=cfg.checkpoint_every,
        log_every=10,
        experiment=cfg.experiment,
        run_name=f"compare-{row}",
        track=cfg.track,
        register=False,
    )
    t.data.source = "cifar10"
    t.data.root = cfg.data_root
    t.data.limit = cfg.data_limit
    t.data.cache = cfg.data_cache
    t.data.cache_dir = Path(cfg.output_dir) / "latent_cache"
    if init is not None:
        t.student.init = init
    if recipe == "v3":
        t.student.plan = cfg.v3_plan
    if row in PLANNED_ROWS:
        _, t.student.plan, dropout = PLANNED_ROWS[row]
        t.student.width = cfg.v1_tiny_width
        if dropout:
            t.schedule.caption_dropout_start = t.schedule.caption_dropout_end = cfg.v1_tiny_dropout
    if row == LONG_ROW:
        t.max_steps = long_row_steps(cfg)
    periodic = bool(recipe_values(recipe)["eval"].get("every"))
    t.eval.every = cfg.eval_every if periodic else 0
    t.eval.num_images = cfg.eval_num_images
    t.eval.reference_n = cfg.reference_n
    t.eval.classifier = cfg.classifier
    t.eval.steps, t.eval.guidance, t.eval.scheduler = cfg.recipe_steps, cfg.recipe_guidance, cfg.recipe_sampler
    t.eval.lpips_net = cfg.lpips_net
    t.eval.batch_size = cfg.eval_batch_size
    t.eval.feature_precision = cfg.feature_precision  # the periodic FID is the comparison's protocol at a smaller N
    return t.resolved()


def settings_of(cfg: CompareConfig) -> list[Any]:
    from distill_sd_prune.evaluation.scoring import SamplingSetting

    return [
        SamplingSetting("recipe", cfg.recipe_steps, cfg.recipe_guidance, cfg.recipe_sampler),
        SamplingSetting(TEACHER, cfg.teacher_steps, cfg.teacher_guidance, cfg.teacher_sampler),
    ]


def protocol_of(cfg: CompareConfig) -> Any:
    from distill_sd_prune.evaluation.scoring import ScoringProtocol

    return ScoringProtocol(
        cfg.num_images,
        reference=cfg.reference,
        reference_n=cfg.reference_n,
        seed=cfg.seed,
        purpose="comparison",
        feature_precision=cfg.feature_precision,
        bootstrap_resamples=cfg.bootstrap_resamples,
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def check_same_comparison(cfg: CompareConfig) -> list[str]:
    """Refuse to resume a folder that holds a comparison with other options; record the options otherwise.

    Returns the rows of the comparison: the folder's rows, then any new ones of ``cfg.rows`` (a comparison grows;
    the rows already trained and scored are kept)."""
    from distill_common.checkpoint import write_json

    path = Path(cfg.output_dir) / CONFIG_FILE
    skip = RESUMABLE_FIELDS + EXTENDABLE_FIELDS
    current = json.loads(json.dumps({k: v for k, v in to_dict(cfg).items() if k not in skip}, default=str))
    saved_all = _read_json(path)
    if saved_all:
        # an option newer than the folder's record compares against its default, which is what that run used
        defaults = json.loads(json.dumps(to_dict(CompareConfig()), default=str))
        saved = {k: saved_all.get(k, defaults.get(k)) for k in set(saved_all) | set(current) if k not in skip}
        differing = sorted(k for k in saved if saved.get(k) != current.get(k))
        if differing:
            raise ConfigError(
                f"{cfg.output_dir} holds a comparison with other options (differing: {', '.join(differing)}); "
                "rerun it with its own options (see its compare_config.json) or pass another --output-dir"
            )
        rows = list(saved_all.get("rows", []))
        rows += [r for r in cfg.rows if r not in rows]
        if rows != saved_all.get("rows"):
            write_json(path, {**saved_all, "rows": rows})
        return rows
    write_json(path, to_dict(cfg))
    return list(cfg.rows)


def finished_row(cfg: CompareConfig, row: str) -> dict[str, Any]:
    """A row's ``done.json`` when its training finished and its student is on disk; else ``{}``."""
    done = _read_json(row_done_path(cfg, row))
    return done if done and (Path(done["final_dir"]) / "generator.json").is_file() else {}


def train_row(cfg: CompareConfig, row: str, console: Any = None) -> dict[str, Any]:
    """Train one row (or resume it, or return it when done); returns its ``done.json``."""
    from distill_common import tracking
    from distill_common.checkpoint import write_json
    from distill_sd_prune.training.loop import checkpoint_run_id, train

    tcfg = row_train_config(cfg, row)
    if done := finished_row(cfg, row):
        return done
    if console is not None:
        console.print(f"[bold]{row}[/]: recipe {tcfg.recipe}, plan {tcfg.student.plan}, width "
                      f"{tcfg.student.width}, init {tcfg.student.init}, {tcfg.max_steps} steps")
    run_id = checkpoint_run_id(tcfg.output_dir) if tcfg.resume else None
    with tracking.start_run(
        tcfg.experiment,
        tcfg.run_name,
        config=tcfg,
        tags={"recipe": tcfg.recipe, "family": "sd_student_prune", "kind": "training", "comparison_row": row},
        fallback_dir=tcfg.output_dir,
        enabled=tcfg.track,
        run_id=run_id,
    ) as run:
        result = train(tcfg, run if tcfg.track else None, run_id=run.run_id, show_progress=console is not None)
    done = {
        "row": row,
        "recipe": tcfg.recipe,
        "final_dir": str(result.final_dir),
        "steps": result.steps,
        "run_id": run.run_id,
        "student": result.student_info,
        "periodic": result.history,
    }
    write_json(row_done_path(cfg, row), done)
    return done


def _complexity(generator: Any) -> dict[str, Any]:
    from distill_sd_prune.architecture.complexity import count_parameters, unet_macs

    vae_factor = 2 ** (len(generator.pipe.vae.config.block_out_channels) - 1)
    macs = unet_macs(generator.unet.config, generator.resolution // vae_factor)
    return {"params": count_parameters(generator.unet), "gmacs": macs.total / 1e9}


def score_models(
    cfg: CompareConfig, models: dict[str, Path], meta: dict[str, dict[str, Any]], console: Any = None
) -> tuple[list[dict[str, Any]], Any]:
    """Generate (resumable PNGs) and score every model under every setting; returns (rows, scorer)."""
    from distill_common.checkpoint import write_json
    from distill_common.generator import load_generator
    from distill_eval.benchmark import generate_to_folder, load_png_folder
    from distill_eval.timing import time_generator
    from distill_sd_prune.evaluation.scoring import ProtocolScorer

    out = Path(cfg.output_dir)
    generators = {
        label: load_generator(str(folder), device=cfg.device, batch_size=cfg.eval_batch_size)
        for label, folder in models.items()
    }
    resolution = int(generators[TEACHER].resolution)
    scorer = ProtocolScorer(
        protocol_of(cfg),
        resolution=resolution,
        classifier=cfg.classifier,
        lpips_net=cfg.lpips_net,
        batch_size=cfg.eval_batch_size,
        data_root=cfg.data_root,
    )
    rows = []
    for setting in settings_of(cfg):
        folders = {label: out / "images" / setting.name / label for label in models}
        for label, gen in generators.items():
            if int(gen.resolution) != resolution:
                raise ConfigError(f"{label} draws {gen.resolution}px images but the teacher {resolution}px; "
                                  "compare students of this teacher only")
            gen.set_scheduler(setting.sampler)
            n = generate_to_folder(gen, setting.steps, scorer.prompts, scorer.seeds, folders[label],
                                   guidance=setting.guidance, batch_size=cfg.eval_batch_size)
            if console is not None and n:
                console.print(f"{label}: {n} images at {setting.label()}", highlight=False)
        teacher_images = load_png_folder(folders[TEACHER], cfg.num_images)
        for label, gen in generators.items():
            path = out / "scores" / f"{setting.name}-{label}.json"
            row = _read_json(path)
            if not row:
                images = teacher_images if label == TEACHER else load_png_folder(folders[label], cfg.num_images)
                row = scorer.score(images, None if label == TEACHER else teacher_images)
                if label == TEACHER:
                    row["lpips_to_teacher"] = 0.0
                gen.set_scheduler(setting.sampler)
                timing = time_generator(gen, setting.steps, conditions=scorer.prompts[: cfg.eval_batch_size],
                                        seeds=scorer.seeds[: cfg.eval_batch_size], guidance=setting.guidance,
                                        repeats=cfg.timing_repeats)
                row.update(
                    model=label,
                    setting=setting.name,
                    steps=setting.steps,
                    sampler=setting.sampler,
                    guidance=setting.guidance,
                    ms_per_image=timing.ms_per_image,
                    **_complexity(gen),
                    **meta.get(label, {}),
                )
                write_json(path, row)
            else:  # a score written before a meta column existed gets it too
                row.update(meta.get(label, {}))
            rows.append(row)
    add_relative_columns(rows)
    return rows, scorer


def add_relative_columns(rows: list[dict[str, Any]]) -> None:
    """Each row against the teacher's row of its setting: parameter / MAC / FID ratios, accuracy share, goal."""
    teachers = {r["setting"]: r for r in rows if r["model"] == TEACHER}
    for r in rows:
        t = teachers.get(r["setting"])
        if t is None:
            continue
        r["params_vs_teacher"] = r["params"] / t["params"]
        r["gmacs_vs_teacher"] = r["gmacs"] / t["gmacs"]
        r["fid_vs_teacher"] = r["fid"] / t["fid"] if t.get("fid") else None
        accuracy, teacher_accuracy = r.get("class_accuracy"), t.get("class_accuracy")
        if accuracy is not None and teacher_accuracy:
            r["class_accuracy_vs_teacher"] = accuracy / teacher_accuracy
        if r["model"] == TEACHER:
            r["goal"] = ""
        elif accuracy is None or teacher_accuracy is None:
            r["goal"] = "n/a (no classifier)"
        else:
            met = (
                r["params_vs_teacher"] <= GOAL_PARAMS
                and r["fid"] <= GOAL_FID * t["fid"]
                and accuracy >= GOAL_ACCURACY * teacher_accuracy
            )
            r["goal"] = "met" if met else "no"


def _interval(row: dict[str, Any], metric: str) -> str:
    low, high = row.get(f"{metric}_ci95_low"), row.get(f"{metric}_ci95_high")
    value = row.get(metric)
    if value is None:
        return "n/a"
    return f"{value:.4g} [{low:.4g}, {high:.4g}]" if low is not None and high is not None else f"{value:.4g}"


def answer(rows: list[dict[str, Any]], a: str, b: str, metric: str = "fid", lower: bool = True) -> str | None:
    """One claim answered with intervals: does ``a`` beat ``b`` on ``metric`` (at the recipe setting)?"""
    by = {r["model"]: r for r in rows if r["setting"] == "recipe"}
    if a not in by or b not in by or by[a].get(metric) is None or by[b].get(metric) is None:
        return None
    ra, rb = by[a], by[b]
    la, ha = ra.get(f"{metric}_ci95_low"), ra.get(f"{metric}_ci95_high")
    lb, hb = rb.get(f"{metric}_ci95_low"), rb.get(f"{metric}_ci95_high")
    text = f"{metric} {a} {_interval(ra, metric)} vs {b} {_interval(rb, metric)}: "
    if None in (la, ha, lb, hb):
        return text + "no intervals"
    better = ha < lb if lower else la > hb
    worse = la > hb if lower else ha < lb
    return text + (f"{a} better (intervals separated)" if better else
                   f"{a} worse (intervals separated)" if worse else "not separated (intervals overlap)")


def claims(rows: list[dict[str, Any]], random_recipe: str) -> list[str]:
    """Seed 004's claims and the goal, answered from the table (recipe setting)."""
    questions = [
        ("V2.2 beats V2.1 (output KD, alpha(t), caption dropout)", "v2.2", "v2.1"),
        ("feature KD helps: V1 (feature + output KD, projection init, progressive chain, EMA) vs V2.1", "v1", "v2.1"),
        (f"teacher-weight init beats random init at the same budget ({random_recipe})", random_recipe, "random"),
        ("removing blocks beats narrowing alone at V1's recipe: v1-tiny (sd_tiny, narrowed) vs V1 (narrow 0.5)",
         "v1-tiny", "v1"),
        ("caption dropout helps a KD student under CFG: v1-tiny-dropout vs v1-tiny", "v1-tiny-dropout", "v1-tiny"),
        ("a longer budget helps: v1-tiny-long vs v1-tiny-dropout (the same student and recipe)", LONG_ROW,
         "v1-tiny-dropout"),
    ]
    out = []
    for title, a, b in questions:
        for metric, lower in (("fid", True), ("class_accuracy", False)):
            text = answer(rows, a, b, metric, lower)
            if text:
                out.append(f"{title}: {text}")
    met = [r["model"] for r in rows if r.get("goal") == "met"]
    out.append(f"goal (<= {GOAL_PARAMS:.0%} of the teacher's UNet parameters, FID <= {GOAL_FID}x the teacher's, class "
               f"accuracy >= {GOAL_ACCURACY:.0%} of its): " + (", ".join(sorted(set(met))) if met else "no student"))
    return out


COLUMNS = [
    "model", "recipe", "init", "budget", "train_steps", "setting", "steps", "sampler", "guidance", "params",
    "params_vs_teacher", "gmacs", "gmacs_vs_teacher", "ms_per_image", "fid", "fid_ci95_low", "fid_ci95_high", "fid_vs_teacher",
    "class_accuracy", "class_accuracy_ci95_low", "class_accuracy_ci95_high", "class_accuracy_vs_teacher",
    "lpips_to_teacher", "kid", "goal",
]


def write_grid(cfg: CompareConfig, scorer: Any, labels: list[str], rows: list[dict[str, Any]]) -> Path:
    """Teacher vs students at the recipe setting: one column per model, one row per prompt (same seeds)."""
    from distill_eval.benchmark import load_png_folder
    from distill_eval.grids import comparison_grid

    out = Path(cfg.output_dir)
    n = min(cfg.grid_rows, cfg.num_images)
    by = {r["model"]: r for r in rows if r["setting"] == "recipe"}
    columns = []
    for label in labels:
        images = load_png_folder(out / "images" / "recipe" / label, n)
        fid = by.get(label, {}).get("fid")
        columns.append((f"{label} · FID {fid:.3g}" if fid is not None else label, images))
    path = out / "grid.png"
    comparison_grid(columns, scorer.prompts[:n], path,
                    title=f"{settings_of(cfg)[0].label()} · seeds {cfg.seed}..{cfg.seed + n - 1}")
    return path


def register_and_promote(cfg: CompareConfig, run: Any, done: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
                         protocol: dict[str, Any], state: dict[str, Any]) -> Any:
    """Register each student once, stamp its recipe-setting numbers and protocol, then run the promotion gate.

    When some students meet the goal (at every setting), only they are eligible: the winner is the lowest-FID one
    of them, and a champion that misses the goal gives way to it. Otherwise every student is."""
    from distill_common import promotion, tracking
    from distill_common.checkpoint import write_json
    from distill_sd_prune.evaluation.champions import register_student

    out = Path(cfg.output_dir)
    versions = state.setdefault("versions", {})
    for row, info in done.items():
        if row not in versions:
            student = {**info["student"], "recipe": info["recipe"], "resolution": int(protocol["resolution"])}
            versions[row] = register_student(run, info["final_dir"], cfg.registered_name, student)
            write_json(out / STATE_FILE, state)
    by = {r["model"]: r for r in rows if r["setting"] == "recipe"}
    keys = ("fid", "fid_ci95_low", "fid_ci95_high", "kid", "lpips_to_teacher", "ms_per_image", "class_accuracy",
            "class_accuracy_ci95_low", "class_accuracy_ci95_high", "params", "gmacs")
    steps = cfg.recipe_steps
    for row, version in versions.items():
        if row not in by:  # registered by an earlier run of the folder, not in this table
            continue
        r = by[row]
        stamp: dict[str, Any] = {f"eval.s{steps}.{k}": r[k] for k in keys if _finite(r.get(k))}
        stamp.update({"eval.protocol": json.dumps(protocol, sort_keys=True, default=str), "eval.run_id": run.run_id,
                      "eval.guidance": cfg.recipe_guidance, "eval.sampler": cfg.recipe_sampler,
                      "comparison.row": row, "comparison.goal": goal_of(rows, row)})
        tracking.set_version_tags(cfg.registered_name, version, stamp)
    eligible = [version for row, version in versions.items() if row in by and goal_of(rows, row) == "met"]
    decision = promotion.decide(cfg.registered_name, "fid", max_steps=None, min_improvement=cfg.min_improvement,
                                eligible=eligible or None, eligible_reason="the students meeting the goal")
    promotion.apply(decision)
    return decision


def goal_of(rows: list[dict[str, Any]], model: str) -> str:
    """``met`` when the model meets the goal at every setting it was scored at, else ``no`` (or why not)."""
    goals = {r.get("goal") for r in rows if r["model"] == model}
    if goals == {"met"}:
        return "met"
    if goals & {"met", "no"}:
        return "no"
    return next(iter(goals), "n/a")  # e.g. "n/a (no classifier)"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_compare(cfg: CompareConfig, console: Any = None) -> dict[str, Any]:
    """Train (or resume) every row, score all models, write the table and grid, register and promote."""
    from distill_common import tracking
    from distill_common.checkpoint import write_json
    from distill_common.models import load_sd_components
    from distill_eval.reports import columns_of, interval_note, markdown_table, write_report
    from distill_sd_prune.evaluation.scoring import load_scoring_classifier
    from distill_sd_prune.sampling.generator import write_teacher_folder

    out = Path(cfg.output_dir)
    # what can fail fast does, before anything is written into the folder
    components = load_sd_components(cfg.teacher_model, include=("unet", "vae"), device="cpu")
    resolution = int(components.unet.config.sample_size) * components.vae_scale_factor
    del components
    load_scoring_classifier(cfg.classifier)
    all_rows = check_same_comparison(cfg)

    # the rows asked for are trained (or resumed); the folder's other finished rows stay in the table
    trained = {row: train_row(cfg, row, console) for row in cfg.rows}
    for row in all_rows:
        if row not in trained and (finished := finished_row(cfg, row)):
            trained[row] = finished
    unfinished = [row for row in all_rows if row not in trained]
    if unfinished and console is not None:
        console.print(f"not in this table (training not finished): {', '.join(unfinished)}; rerun with --rows "
                      f"{','.join(unfinished)} to finish them", highlight=False)
    done = {row: trained[row] for row in sorted(trained, key=ROWS.index)}  # the table's order, however it grew
    teacher_dir = out / "teacher_generator"
    if not (teacher_dir / "generator.json").is_file():
        write_teacher_folder(teacher_dir, cfg.teacher_model, resolution)
    models = {TEACHER: teacher_dir, **{row: Path(d["final_dir"]) for row, d in done.items()}}
    meta = {
        TEACHER: {"recipe": "", "init": "", "budget": TEACHER},
        **{row: {"recipe": d["recipe"], "init": d["student"]["init"], "budget": d["student"]["budget"],
                 "train_steps": d["steps"]} for row, d in done.items()},
    }
    rows, scorer = score_models(cfg, models, meta, console)
    grid = write_grid(cfg, scorer, list(models), rows)
    protocol = scorer.protocol_dict(settings_of(cfg)[0])
    report_meta = {
        "protocol": scorer.fid_protocol(),
        "prompts": f"{cfg.num_images} held-out caption templates x CIFAR-10 classes; seeds "
                   f"{cfg.seed}..{cfg.seed + cfg.num_images - 1}",
        "settings": "; ".join(s.label() for s in settings_of(cfg)),
        "budget": f"{cfg.max_steps} optimiser steps, batch {cfg.batch_size} (V3: x4 gradient accumulation)"
                  + (f"; {LONG_ROW}: {long_row_steps(cfg)} steps" if LONG_ROW in done else ""),
        "rows not finished (not in the table)": ", ".join(unfinished) or "none",
        "intervals": interval_note(cfg.bootstrap_resamples) + "; class accuracy: Wilson 95%",
        "periodic evaluation (same protocol code, smaller N)": "; ".join(
            periodic_summary(row, d["periodic"]) for row, d in done.items() if d["periodic"]
        ) or "none",
    }
    claim_lines = claims(rows, cfg.random_recipe)
    state = _read_json(out / STATE_FILE)
    decision = None
    with tracking.start_run(cfg.experiment, "compare", config=cfg, tags={"kind": "comparison"}, fallback_dir=out,
                            enabled=cfg.track, run_id=state.get("run_id")) as run:
        if cfg.track:
            state["run_id"] = run.run_id
            write_json(out / STATE_FILE, state)
        if cfg.promote:
            decision = register_and_promote(cfg, run, done, rows, protocol, state)
            report_meta["promotion"] = (f"{cfg.registered_name} v{decision.chosen.version} "
                                        f"({_row_of(state, decision.chosen.version)}): "
                                        f"{'promoted' if decision.promote else 'not promoted'}, {decision.reason}")
        report = write_report(rows, out, REPORT, columns=COLUMNS,
                              meta={**report_meta, "claims": claim_lines,
                                    "periodic": {row: d["periodic"] for row, d in done.items() if d["periodic"]}})
        report["md"].write_text(
            f"# {REPORT}\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in report_meta.items())
            + "\n\n## Claims (recipe setting; 95% intervals)\n\n" + "\n".join(f"- {c}" for c in claim_lines)
            + "\n\n## Table\n\n" + markdown_table(rows, columns_of(rows, COLUMNS)) + "\n\n![teacher vs students](grid.png)\n"
        )
        if cfg.track:
            for r in rows:
                run.log_metrics({f"{r['model']}.{r['setting']}.{k}": float(r[k]) for k in
                                 ("fid", "class_accuracy", "lpips_to_teacher", "ms_per_image") if _finite(r.get(k))})
            for path in report.values():
                run.log_artifact(path, "report")
            run.log_artifact(grid, "grids")
    return {"rows": rows, "report": report, "grid": grid, "decision": decision, "claims": claim_lines,
            "promotion": report_meta.get("promotion")}


def periodic_summary(row: str, history: list[dict[str, Any]]) -> str:
    """The last periodic evaluation of a row, e.g. ``v2.1 @ step 500: FID 41.2 [39.0, 43.4], LPIPS 0.21 (N=200)``."""
    last = history[-1]
    fid = last.get("eval/fid")
    low, high = last.get("eval/fid_ci95_low"), last.get("eval/fid_ci95_high")
    text = f"{row} @ step {last['step']}: FID {fid:.4g}" if fid is not None else f"{row} @ step {last['step']}"
    if low is not None and high is not None:
        text += f" [{low:.4g}, {high:.4g}]"
    if last.get("eval/lpips_to_teacher") is not None:
        text += f", LPIPS {last['eval/lpips_to_teacher']:.3g}"
    return text + f" (N={int(last.get('eval/num_images', 0))}, {len(history)} evaluations)"


def _row_of(state: dict[str, Any], version: str) -> str:
    return next((row for row, v in state.get("versions", {}).items() if str(v) == str(version)), "?")
