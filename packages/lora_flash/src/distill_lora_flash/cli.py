"""``distill flash``: few-step generation with a Flash LoRA, LoRA student distillation, and evaluation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from distill_common.config import config_command
from distill_common.output_dir import claims_output_dir
from distill_lora_flash.config import (
    EVAL_PRESETS,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    TrainConfig,
    TurboConfig,
)

app = typer.Typer(help="Flash LoRA: 2/4/8-step SD 1.5 generation, SD-Turbo / SDXL-Turbo few-step generation "
                  "(text and image to image), LoRA student distillation from a CFG teacher (noise matching or "
                  "LCM-LoRA, SD 1.5 and SDXL), LoRA export (diffusers, peft, kohya) and baseline-vs-student "
                  "evaluation.", no_args_is_help=True)
RUN_ID_FILE = "mlflow_run_id"


@config_command(app, "generate", GenerateConfig)
@claims_output_dir(lambda cfg: cfg.outdir, flag="--outdir")
def generate(cfg: GenerateConfig) -> None:
    """Generate with the Flash LoRA at each --steps (LCM, guidance 0), optionally next to the 30-step CFG baseline.

    Writes image_s{steps}_i{idx}_seed{seed}.png, grid_s{steps}_seed{seed}.png, baseline/..., compare_... and
    summary.{csv,json,md} (time/image, speed-up, CLIPScore, quality retention).
    """
    from distill_lora_flash.generation import run_generate

    console = Console()
    result = run_generate(cfg, console)
    console.print(f"{len(result.files)} files in {cfg.outdir}; summary: {result.report_paths['csv']}", highlight=False)


@config_command(app, "turbo", TurboConfig)
@claims_output_dir(lambda cfg: cfg.outdir, flag="--outdir")
def turbo(cfg: TurboConfig) -> None:
    """SD-Turbo / SDXL-Turbo style models at 1-4 steps, guidance 0, with the model's own scheduler (diffusers'
    AutoPipelineForText2Image); --init-image and --strength for image-to-image (AutoPipelineForImage2Image).

    Writes the same files and summary table (time/image, speed-up vs --compare-baseline, CLIPScore) as generate.
    """
    from distill_lora_flash.turbo import run_turbo

    console = Console()
    result = run_turbo(cfg, console)
    console.print(f"{len(result.files)} files in {cfg.outdir}; summary: {result.report_paths['csv']}", highlight=False)


def _run_dir(cfg: TrainConfig) -> Path:
    from distill_lora_flash.training import run_dir

    return run_dir(cfg)


@contextlib.contextmanager
def _tracking_run(cfg: TrainConfig, folder: Path):
    """The run's MLflow run, continued after a resume when its id is on disk and the store still has it."""
    from distill_common import tracking

    tags = {"kind": "training", "family": "lora_flash"}
    previous = (folder / RUN_ID_FILE).read_text().strip() if (folder / RUN_ID_FILE).is_file() else None
    with contextlib.ExitStack() as stack:
        run = None
        if previous and cfg.track:
            try:
                run = stack.enter_context(tracking.start_run(cfg.experiment, cfg.run_name, run_id=previous,
                                                             fallback_dir=folder))
            except Exception:  # noqa: BLE001 - another store, or the run was deleted: start a new one
                run = None
        if run is None:
            run = stack.enter_context(tracking.start_run(cfg.experiment, cfg.run_name, config=cfg, tags=tags,
                                                         fallback_dir=folder, enabled=cfg.track))
        if run.run_id:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / RUN_ID_FILE).write_text(run.run_id)
        yield run


@config_command(app, "train", TrainConfig)
@claims_output_dir(lambda cfg: _run_dir(cfg), flag="--run-name")
def train(cfg: TrainConfig) -> None:
    """Distil the base model (SD 1.5 or SDXL) into a LoRA: --method noise_matching (CFG noise matching, Min-SNR,
    optional discrete LCM timesteps) or --method lcm (LCM-LoRA consistency distillation, Luo et al. 2023).

    Writes OUTPUT_DIR/RUN_NAME/lora/checkpoint-N/ and lora/final/ (diffusers LoRA files), resumes after a kill,
    logs losses and validation grids (teacher next to the 2/4/8-step student) to MLflow, and registers the final
    LoRA as an MLflow pyfunc generator.
    """
    from distill_common import tracking
    from distill_common.runtime import is_main_process
    from distill_lora_flash.training import TrainHooks, run_dir
    from distill_lora_flash.training import train as run_training

    console = Console()
    folder = run_dir(cfg)
    with _tracking_run(cfg, folder) as run:
        hooks = TrainHooks(metrics=lambda step, m: run.log_metrics({f"train.{k}": v for k, v in m.items()}, step=step),
                           images=lambda step, images: _log_validation(run, folder, step, images))
        result = run_training(cfg, hooks, console)
        if not is_main_process():  # under `accelerate launch` rank 0 alone writes, logs and registers the LoRA
            return
        console.print(f"final LoRA: {result.final_dir} (step {result.global_step})", highlight=False)
        if cfg.track:
            uri = tracking.log_generator_model(run, result.generator_dir)
            console.print(f"generator model: {uri}", highlight=False)
            if cfg.register_name:
                version = tracking.register_model(uri, cfg.register_name,
                                                  tags={"family": "lora_flash", "steps": result.global_step,
                                                        "method": cfg.method},
                                                  description=f"Flash LoRA student ({cfg.method}) of {cfg.base_model}")
                console.print(f"registered {cfg.register_name} version {version}", highlight=False)


@config_command(app, "export", ExportConfig)
def export(cfg: ExportConfig) -> None:
    """Write a trained LoRA as --format diffusers (default), peft or kohya (lora_unet_* keys with .alpha tensors,
    loaded by ComfyUI, AUTOMATIC1111, SD.Next, InvokeAI and diffusers' load_lora_weights); rank and alpha are kept.
    """
    from distill_lora_flash.export import export_lora

    path = export_lora(cfg.lora_path, cfg.format, cfg.output)
    Console().print(f"{cfg.format} LoRA: {path}", highlight=False)


def _log_validation(run: Any, folder: Path, step: int, images: dict[str, Any]) -> None:
    """Validation grid (teacher column next to the student's 2/4/8-step columns) to disk and MLflow."""
    target = folder / "validation" / f"step_{step:07d}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    images["grid"].save(target)
    run.log_artifact(target, "validation")


@config_command(app, "eval", EvalConfig, presets=EVAL_PRESETS)
@claims_output_dir(lambda cfg: cfg.output_dir)
def evaluate(cfg: EvalConfig) -> None:
    """Baseline (30 steps, CFG 7.5) vs LoRA students at 2/4/8 steps on a prompt list at fixed seeds.

    Several --lora-path LABEL=PATH make one table; --control adds the base model without a LoRA at the same
    steps. --preset demo is the seed project's protocol: the 20 packaged demo_prompts.txt prompts x 10 images.

    Reports time/image, speed-up, CLIPScore, class accuracy and their retention, LPIPS to the baseline image of
    the same seed and optional FID (and its ratio to the baseline's), with comparison grids, logged to MLflow.
    Each model's images are cached on their own: adding a LoRA reuses the others'.
    """
    from distill_common import tracking
    from distill_lora_flash.evaluation import run_eval

    console = Console()
    with tracking.start_run(cfg.experiment, Path(cfg.output_dir).name, config=cfg,
                            tags={"kind": "evaluation", "family": "lora_flash"}, fallback_dir=cfg.output_dir,
                            enabled=cfg.track) as run:
        result = run_eval(cfg, tracking_run=run if cfg.track else None, console=console)
    console.print(f"report: {result.report_paths['md']}", highlight=False)


def main() -> None:
    from distill_common.cli import run_app

    run_app(app)


if __name__ == "__main__":
    main()
