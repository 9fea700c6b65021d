"""``distill rf``: train-teacher | make-pairs | distill | sample | evaluate | pipeline (each with --preset smoke|cpu|paper)
| compare (--preset smoke|tiny|paper)."""

from __future__ import annotations

import typer
from rich.console import Console

from distill_common.config import config_command
from distill_common.output_dir import claims_output_dir
from distill_rf_cifar.config import (
    COMPARE_PRESETS,
    DISTILL_PRESETS,
    EVALUATE_PRESETS,
    PAIRS_PRESETS,
    PIPELINE_PRESETS,
    TEACHER_PRESETS,
    CompareConfig,
    DistillConfig,
    EvaluateConfig,
    PairsConfig,
    PipelineConfig,
    SampleConfig,
    SDSConfig,
    TeacherConfig,
)

app = typer.Typer(help="CIFAR-10 rectified flow: teacher, noise→image pairs, students by recipe (one_step, k_step, "
                       "reflow, progressive, adversarial, consistency, guided), sampling, SDS, FID-vs-NFE, the "
                       "main-job pipeline and the comparison of every recipe.", no_args_is_help=True)
console = Console()


@config_command(app, "train-teacher", TeacherConfig, presets=TEACHER_PRESETS, default_preset="smoke")
@claims_output_dir(lambda cfg: cfg.output_dir)  # before torch is imported: a refused run exits at once
def train_teacher_cmd(cfg: TeacherConfig) -> None:
    """Train the rectified-flow teacher on CIFAR-10 (resumes from the latest checkpoint in --output-dir)."""
    from distill_rf_cifar.stages import train_teacher

    outcome = train_teacher(cfg, console=console)
    if outcome.finished and outcome.generator_dir is not None:
        console.print(f"teacher generator: {outcome.generator_dir}" + (f"  (MLflow model {outcome.model_uri})"
                                                                       if outcome.model_uri else ""))


@config_command(app, "make-pairs", PairsConfig, presets=PAIRS_PRESETS, default_preset="smoke")
@claims_output_dir(lambda cfg: cfg.output_dir)  # before torch is imported: a refused run exits at once
def make_pairs_cmd(cfg: PairsConfig) -> None:
    """Generate (noise, image, label, seed) pairs from the teacher's ODE into resumable shards + manifest.json."""
    from distill_rf_cifar.stages import make_pairs

    outcome = make_pairs(cfg, console=console)
    console.print(f"pairs: {outcome.info['num_pairs']} in {outcome.folder}")


@config_command(app, "distill", DistillConfig, presets=DISTILL_PRESETS, default_preset="smoke")
@claims_output_dir(lambda cfg: cfg.folder)  # before torch is imported: a refused run exits at once
def distill_cmd(cfg: DistillConfig) -> None:
    """Train a student from the teacher's weights with --recipe one_step | k_step | reflow | progressive |
    adversarial | consistency | guided | dmd | guided_progressive ('four_step' is the old name of k_step)."""
    from distill_rf_cifar.stages import distill_student

    outcome = distill_student(cfg, console=console)
    if outcome.finished:
        console.print(f"{cfg.recipe} generator: {outcome.generator_dir}")


@config_command(app, "sample", SampleConfig)
@claims_output_dir(lambda cfg: cfg.output_dir)  # before torch is imported: a refused run exits at once
def sample_cmd(cfg: SampleConfig) -> None:
    """Write PNGs and a grid (rows = classes, columns = seeds) from a generator folder or models:/ URI."""
    from distill_rf_cifar.stages import sample

    sample(cfg, console=console)


@config_command(app, "sds", SDSConfig)
@claims_output_dir(lambda cfg: cfg.output_dir)  # before torch is imported: a refused run exits at once
def sds_cmd(cfg: SDSConfig) -> None:
    """Score distillation sampling (Poole et al. 2022): optimise images of one class from noise with the teacher's
    score for each --guidance-scales value; trajectory grids and the diversity (LPIPS) of SDS vs teacher samples."""
    from distill_rf_cifar.sds import run

    run(cfg, console=console)


@config_command(app, "evaluate", EvaluateConfig, presets=EVALUATE_PRESETS, default_preset="smoke")
@claims_output_dir(lambda cfg: cfg.output_dir)  # before torch is imported: a refused run exits at once
def evaluate_cmd(cfg: EvaluateConfig) -> None:
    """FID-vs-NFE sweep (teacher: Euler steps + RK45; students: 1, 2, 4 steps) with latency, grid and plots."""
    from distill_eval.reports import interval_note, print_table
    from distill_rf_cifar.stages import evaluate

    result, _ = evaluate(cfg, console=console)
    print_table(result.rows, ["model", "sampler", "steps", "nfe", "fid", "class_accuracy", "ms_per_image",
                              "speedup_vs_teacher", "fid_vs_best", "fid_vs_teacher", "fid_vs_teacher_nfe"],  # KID: in the report
                title=f"FID vs NFE ({result.protocol['reference_set']}, N={result.protocol['generated_n']})",
                console=console)
    console.print(interval_note(cfg.eval.bootstrap_resamples), highlight=False)
    console.print(f"grid: {result.grid_path}\nplots: {', '.join(map(str, result.plot_paths))}", highlight=False)


@config_command(app, "pipeline", PipelineConfig, presets=PIPELINE_PRESETS, default_preset="smoke")
@claims_output_dir(lambda cfg: cfg.folder)  # before torch is imported: a refused run exits at once
def pipeline_cmd(cfg: PipelineConfig) -> None:
    """THE MAIN JOB: teacher → pairs → four-step and one-step students → FID and ms/image vs the teacher →
    MLflow registry and champion → table. Rerunning resumes and skips finished stages."""
    from distill_rf_cifar.pipeline import run_pipeline

    run_pipeline(cfg, console=console)


@config_command(app, "compare", CompareConfig, presets=COMPARE_PRESETS, default_preset="smoke")
@claims_output_dir(lambda cfg: cfg.folder)  # one compare per folder: a second one is refused at once
def compare_cmd(cfg: CompareConfig) -> None:
    """Every distillation recipe (one_step, k_step, reflow, progressive, adversarial, consistency, guided) from one
    --teacher under one budget of optimizer steps: one table (FID with interval at 1/2/4 steps, LPIPS to the teacher,
    ms/image, training time), one plot, an MLflow parent run with a child per method."""
    from distill_rf_cifar.compare import print_compare, run_compare

    print_compare(run_compare(cfg, console=console), console)


def main() -> None:
    from distill_common.cli import run_app

    run_app(app)


if __name__ == "__main__":
    main()
