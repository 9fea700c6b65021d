"""``distill prune``: prepare pruned / narrowed student UNets, train them (recipes v1, v2.1, v2.2, v3),
generate, evaluate against the teacher, and promote per-budget champions in the MLflow registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from distill_common.config import config_command, option, save_config
from distill_common.errors import ConfigError
from distill_common.output_dir import claims_output_dir
from distill_common.runtime import DEVICES
from distill_sd_prune.architecture.channel_init import INIT_METHODS
from distill_sd_prune.architecture.pruning import PRUNE_PLANS
from distill_sd_prune.evaluation.compare import CompareConfig
from distill_sd_prune.evaluation.evaluate import EvaluateConfig
from distill_sd_prune.sampling.pipeline import HEADLINE_GUIDANCE, HEADLINE_STEPS, SAMPLERS
from distill_sd_prune.training.config import DEFAULT_TEACHER, TrainConfig

app = typer.Typer(
    help="Smaller Stable Diffusion students: block pruning (sd_small, sd_tiny), channel narrowing, "
    "distillation recipes v1 / v2.1 / v2.2 / v3, evaluation and per-budget champions.",
    no_args_is_help=True,
)
console = Console()


@dataclass
class PrepareConfig:
    """Options of ``distill prune prepare-unet``."""

    teacher_model: str = option(
        DEFAULT_TEACHER,
        "Teacher (--base-model): hub id, local diffusers folder, single-file checkpoint, or 'reference' (the "
        "shipped CIFAR-sized SD).",
        aliases=("--base-model",),
    )
    plan: str = option("sd_small", "Block pruning plan (--arch: the seed project's name for it).",
                       choices=tuple(PRUNE_PLANS), aliases=("--arch",))
    width: float | None = option(
        None, "Channel width relative to the teacher, in (0, 1] (default: the plan's, 1.0; narrow 0.5).", gt=0, le=1
    )
    init: str = option("slice", "How the student inherits the teacher's weights.", choices=INIT_METHODS)
    resolution: int | None = option(
        None, "Image resolution at which MACs are counted (default: the teacher's, sample_size x VAE factor).", ge=8
    )
    seed: int = option(0, "Seed of the random initialisation (init random).")
    output_dir: Path = option(
        Path("runs/prune/student"), "Writes OUTPUT_DIR/unet (diffusers) and prune_map.json."
    )


@config_command(app, "prepare-unet", PrepareConfig)
@claims_output_dir(lambda cfg: cfg.output_dir)
def prepare_unet(cfg: PrepareConfig) -> None:
    """Build a student UNet from the teacher (pruned blocks, narrower channels, inherited weights) and report
    parameters and MACs per UNet call for teacher and student."""
    from distill_common.models import load_sd_components
    from distill_eval.reports import print_table
    from distill_sd_prune.architecture import build_student, save_student
    from distill_sd_prune.architecture.complexity import complexity_row
    from distill_sd_prune.architecture.pruning import plan_notes

    components = load_sd_components(cfg.teacher_model, include=("unet", "vae"), device="cpu")
    resolution = cfg.resolution or int(components.unet.config.sample_size) * components.vae_scale_factor
    latent = resolution // components.vae_scale_factor
    build = build_student(components.unet, cfg.plan, cfg.width, cfg.init, seed=cfg.seed)
    rows = [
        complexity_row("teacher", components.unet, latent),
        complexity_row(f"student ({build.budget})", build.unet, latent),
    ]
    for row in rows:  # the student beside the teacher
        row["params_vs_teacher"] = row["params"] / rows[0]["params"]
        row["gmacs_vs_teacher"] = row["gmacs"] / rows[0]["gmacs"]
    save_student(
        build,
        cfg.output_dir,
        extra={"teacher_model": cfg.teacher_model, "complexity": rows, "resolution": resolution,
               "notes": plan_notes(components.unet.config, build.plan)},
    )
    print_table(rows, list(rows[0]), title=f"UNet per call at {resolution}px", console=console)
    for note in plan_notes(components.unet.config, build.plan):
        console.print(f"plan {build.plan.name}: {note}", highlight=False)
    console.print(
        f"kept {len(build.module_map)} layers, dropped {len(build.dropped)} teacher layers; "
        f"init {build.init}: {build.transfer.counts()}"
    )
    console.print(
        f"student: {Path(cfg.output_dir) / 'unet'}  name map: {Path(cfg.output_dir) / 'prune_map.json'}",
        highlight=False,
    )


@config_command(app, "train", TrainConfig)
@claims_output_dir(lambda cfg: cfg.output_dir)
def train_cmd(cfg: TrainConfig) -> None:
    """Distil a student by a recipe (v1, v2.1, v2.2, v3); unset options take the recipe's values, and every
    resolved option is logged to MLflow. Resumes from OUTPUT_DIR/checkpoints after a kill.

    Defaults shown are those of recipe v2.2 (the default --recipe); another recipe fills the options left unset
    with its own values (see them with --recipe NAME --dry-run)."""
    from accelerate import PartialState

    from distill_common import tracking
    from distill_sd_prune.architecture.student import budget_label, read_prune_map
    from distill_sd_prune.evaluation.champions import register_student
    from distill_sd_prune.training.loop import checkpoint_run_id, train

    cfg = cfg.resolved()
    main = PartialState().is_main_process
    save_config(cfg, Path(cfg.output_dir) / "train_config.yaml")
    run_id = checkpoint_run_id(cfg.output_dir) if cfg.resume else None
    budget = budget_label(cfg.student.plan, cfg.student.width)
    if cfg.student.unet is not None and (Path(cfg.student.unet) / "prune_map.json").is_file():
        budget = read_prune_map(cfg.student.unet)["budget"]
    with tracking.start_run(
        cfg.experiment,
        cfg.run_name or f"{cfg.recipe}-{budget}",
        config=cfg,
        tags={"recipe": cfg.recipe, "family": "sd_student_prune", "kind": "training"},
        fallback_dir=cfg.output_dir,
        enabled=cfg.track and main,
        run_id=run_id,
    ) as run:
        result = train(cfg, run if cfg.track else None, run_id=run.run_id)
        if main and result.final_dir is not None:
            run.log_params(
                {f"built_student.{k}": v for k, v in result.student_info.items()} if run_id is None else {}
            )
            console.print(
                f"student: {result.final_dir}  ({result.student_info['params']:,} parameters, "
                f"{result.student_info['macs'] / 1e9:.3g} GMACs per call)",
                highlight=False,
            )
            if cfg.register:
                if not cfg.track:
                    raise ConfigError("--register needs MLflow tracking; drop --no-track")
                version = register_student(
                    run,
                    result.final_dir,
                    cfg.registered_name,
                    {**result.student_info, "recipe": cfg.recipe, "resolution": cfg.data.resolution},
                )
                console.print(
                    f"registered {cfg.registered_name} version {version} (budget "
                    f"{result.student_info['budget']})"
                )


@dataclass
class GenerateConfig:
    """Options of ``distill prune generate``."""

    generator: str | None = option(
        None, "Student: generator folder, runs:/ or models:/ URI (default: the teacher)."
    )
    teacher_model: str = option(DEFAULT_TEACHER, "The teacher (used when no --generator is given).")
    prompts: list[str] = option([], "Prompts (quote each).")
    prompts_file: Path | None = option(None, "A file of prompts, one a line.")
    coco_prompts: int = option(0, "Use N seeded COCO val captions as prompts.")
    steps: int = option(HEADLINE_STEPS, "Sampler steps.")
    guidance: float = option(HEADLINE_GUIDANCE, "Classifier-free guidance scale (<= 1: off).")
    scheduler: str = option("ddpm", "Sampler.", choices=tuple(SAMPLERS))
    seed: int = option(0, "Seed of the first image (image i uses seed + i).")
    resolution: int = option(512, "Teacher image resolution (students use their own).")
    batch_size: int = option(8, "Images per pipeline call.")
    data_root: Path | None = option(None, "Data root for --coco-prompts.")
    output_dir: Path = option(Path("runs/prune/generate"), "PNG files, prompts.json and grid.png go here.")
    device: str = option("auto", "Device.", choices=DEVICES)


@config_command(app, "generate", GenerateConfig)
@claims_output_dir(lambda cfg: cfg.output_dir)
def generate_cmd(cfg: GenerateConfig) -> None:
    """Generate images with a student (or the teacher) using DDPM, PNDM or DDIM and classifier-free
    guidance."""
    import json

    from torchvision.utils import save_image

    from distill_common.data.prompts import coco_prompt_subset, load_prompts_file
    from distill_common.data.root import resolve_data_root
    from distill_common.generator import load_generator
    from distill_sd_prune.sampling.generator import write_teacher_folder

    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        prompts += load_prompts_file(cfg.prompts_file)
    if cfg.coco_prompts:
        prompts += coco_prompt_subset(
            resolve_data_root(cfg.data_root) / "coco2017", cfg.coco_prompts, seed=cfg.seed
        )
    if not prompts:
        raise ConfigError("no prompts; pass --prompts 'a cat' ..., --prompts-file FILE or --coco-prompts N")
    out = Path(cfg.output_dir)
    source = cfg.generator or str(
        write_teacher_folder(out / "teacher_generator", cfg.teacher_model, cfg.resolution)
    )
    generator = load_generator(source, device=cfg.device, scheduler=cfg.scheduler, batch_size=cfg.batch_size)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    images = generator.generate(prompts, cfg.steps, seeds, cfg.guidance)  # (N, 3, R, R) in [0, 1]
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, out / f"{i:05d}.png")
    save_image(images, out / "grid.png", nrow=min(8, len(images)))
    (out / "prompts.json").write_text(
        json.dumps(
            {
                "prompts": prompts,
                "seeds": seeds,
                "steps": cfg.steps,
                "guidance": cfg.guidance,
                "scheduler": cfg.scheduler,
                "generator": source,
            },
            indent=2,
        )
    )
    console.print(f"{len(images)} images in {out}", highlight=False)


@config_command(app, "evaluate", EvaluateConfig)
@claims_output_dir(lambda cfg: cfg.output_dir)
def evaluate_cmd(cfg: EvaluateConfig) -> None:
    """FID on COCO val, LPIPS to the teacher at the same seed, CLIPScore (with --clip-model), time per image,
    parameters and MACs, at 25 DDPM steps / CFG 5 and the other settings given; stamps registered students and
    moves the champion-<budget> aliases."""
    from distill_common import tracking
    from distill_eval.reports import print_table
    from distill_sd_prune.evaluation.evaluate import evaluate

    save_config(cfg, Path(cfg.output_dir) / "evaluate_config.yaml")
    with tracking.start_run(
        cfg.experiment,
        Path(cfg.output_dir).name,
        config=cfg,
        tags={"kind": "evaluation"},
        fallback_dir=cfg.output_dir,
        enabled=cfg.track,
    ) as run:
        result = evaluate(cfg, tracking_run=run if cfg.track else None, console=console)
    cols = [
        "model",
        "budget",
        "steps",
        "guidance",
        "fid",
        "fid_vs_best",
        "fid_vs_teacher",
        "lpips_to_teacher",
        "clip_score",
        "ms_per_image",
        "params",
        "gmacs",
    ]
    print_table(
        result["rows"],
        [c for c in cols if any(r.get(c) is not None for r in result["rows"])],
        title="sd_student_prune evaluation",
        console=console,
    )
    for decision in result["champions"]:
        state = "moved to" if decision.changed else "stays on"
        console.print(f"{decision.alias} {state} version {decision.version} (fid {decision.value:.4g})")
    console.print(f"report: {result['report']['md']}", highlight=False)


@config_command(app, "compare", CompareConfig)
@claims_output_dir(lambda cfg: cfg.output_dir)
def compare_cmd(cfg: CompareConfig) -> None:
    """Train V1, V2.1, V2.2, V3 and a random-init row from one teacher (default: the reference model) under one
    step budget, score them and the teacher on one protocol (FID with 95% interval, class accuracy, LPIPS to the
    teacher, ms per image, parameters, MACs), write the table and a grid, and promote the winner through the
    promotion gate. A killed comparison resumes where it stopped."""
    from distill_eval.reports import print_table
    from distill_sd_prune.evaluation.compare import run_compare

    result = run_compare(cfg, console=console)
    cols = ["model", "setting", "params", "gmacs", "ms_per_image", "fid", "fid_ci95_low", "fid_ci95_high",
            "class_accuracy", "lpips_to_teacher", "goal"]
    print_table(result["rows"], [c for c in cols if any(r.get(c) is not None for r in result["rows"])],
                title="teacher vs students", console=console)
    for line in result["claims"]:
        console.print(f"- {line}", highlight=False)
    if result["promotion"]:  # registered model, version (row), decision and why
        console.print(f"promotion: {result['promotion']}", highlight=False)
    console.print(f"table: {result['report']['md']}  grid: {result['grid']}", highlight=False)


@dataclass
class PromoteConfig:
    """Options of ``distill prune promote``."""

    registered_name: str = option("sd_student_prune", "Registered model name.")
    steps: int = option(HEADLINE_STEPS, "Step count whose FID decides (eval.s{steps}.fid).")


@config_command(app, "promote", PromoteConfig)
def promote_cmd(cfg: PromoteConfig) -> None:
    """Point champion-<budget> at the lowest-FID evaluated version of every parameter budget."""
    from distill_sd_prune.evaluation.champions import promote_per_budget

    decisions = promote_per_budget(cfg.registered_name, steps=cfg.steps)
    if not decisions:
        console.print(
            f"no evaluated version of {cfg.registered_name!r} carries a budget tag and eval.s{cfg.steps}.fid"
        )
    for d in decisions:
        console.print(
            f"{d.alias}: version {d.version} (fid {d.value:.4g}){'' if d.changed else ' (unchanged)'}"
        )


def main() -> None:
    from distill_common.cli import run_app

    run_app(app)


if __name__ == "__main__":
    main()
