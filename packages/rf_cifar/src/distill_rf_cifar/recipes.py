"""Named recipes: each is a list of phases (a loss, a data set, a share of the steps) run by the one training loop.

=============  =========  ===========================================================================  =======
recipe         data       phases                                                                       steps
=============  =========  ===========================================================================  =======
teacher        images     RectifiedFlowLoss (random init)                                              N
one_step       pairs      PairDistillationLoss: t = 0, L2 or LPIPS (Liu et al. 2023)                   1
k_step         pairs      KStepDistillationLoss: t on the k fixed points of k-step Euler (k = 4)       k
reflow         pairs      ReflowLoss (2-RF, Liu et al. 2023), then PairDistillationLoss on the pairs   1
progressive    images     ProgressiveDistillationLoss rounds 32 -> 16 -> 8 -> 4 (Salimans & Ho 2022)   end
adversarial    pairs+     AdversarialDistillationLoss (ADD, Sauer et al. 2023): -D(fake) + 0.5 L2 to   1-4
               images     the teacher's pair image; hinge + R1 discriminator on real CIFAR-10
consistency    images     ConsistencyDistillationLoss (Song et al. 2023): teacher ODE step on a        2
                          16-interval grid, EMA target; multistep consistency sampling
guided         images     GuidanceConditionedLoss: w-conditioned student of the CFG teacher (Meng      teacher
                          et al. 2023, stage one), one network call per guided step
dmd            images     DistributionMatchingLoss (DMD2, Yin et al. 2024): frozen teacher = real      1
                          score, online fake score (N updates per student step), optional GAN head
guided_        images     guided (stage one), then ProgressiveDistillationLoss rounds over w ~ U       end
progressive               (Meng et al. 2023, stage two): 4 steps at any w, one call per step
=============  =========  ===========================================================================  =======

Students start from the teacher's weights; each phase starts from the previous phase's EMA weights; a
progressive round's frozen teacher is the previous round's student, and every round is exported as a generator
(``<run>/<round>/generator``). Progressive starts that are not powers of two halve rounding up
(1000 -> 500 -> 250 -> 125 -> 63 -> 32 -> 16 -> 8): an odd round's last student step is the teacher's last step
alone, so later students sample on a non-uniform grid, recorded in their ``generator.json``. The reflow recipe distils on the first
teacher's pairs rather than on fresh 2-RF pairs (Liu et al. regenerate them), so it needs one pair set only.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill_common import checkpoint as ckpt
from distill_common.errors import ConfigError, unknown_choice
from distill_rf_cifar.config import RENAMED_RECIPES, FlowConfig, LoopConfig, RecipeConfig
from distill_rf_cifar.losses import (
    AdversarialDistillationLoss,
    ConsistencyDistillationLoss,
    DistributionMatchingLoss,
    GuidanceConditionedLoss,
    KStepDistillationLoss,
    PairDistillationLoss,
    ProgressiveDistillationLoss,
    RectifiedFlowLoss,
    ReflowLoss,
)
from distill_rf_cifar.models.unet import with_guidance_embedding
from distill_rf_cifar.samplers import halve_grid, progressive_step_counts
from distill_rf_cifar.training.data import TrainingData
from distill_rf_cifar.training.loop import MODEL_FILE, SampleFn, TrainingCallback, TrainResult, train

FINAL = "final"


@dataclass
class Phase:
    name: str
    data: str  # "images" | "pairs"
    make_loss: Callable[[nn.Module], nn.Module]  # the model at the phase's start -> its loss
    steps: int
    sample_steps: int  # the step count the model samples with after this phase
    guidance: float = 1.0  # the CFG scale it samples with
    sampler: str = "euler"  # the sampler it samples with (samplers.SAMPLERS)
    student: Callable[[nn.Module], nn.Module] | None = None  # turns the phase's start model into the one it trains
    export: dict[str, Any] = field(default_factory=dict)  # extra generator.json fields of this phase's model


def _teacher(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    return [Phase("teacher", "images", lambda _: RectifiedFlowLoss(flow.time_sampler, flow.label_dropout), steps,
                  teacher_steps, guidance)]


def _one_step(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    return [Phase("one_step", "pairs", lambda _: PairDistillationLoss(opts.distance, opts.lpips_resize), steps, 1)]


def _k_step(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    return [Phase("k_step", "pairs", lambda _: KStepDistillationLoss(opts.k, opts.distance, opts.lpips_resize,
                                                                         opts.k_rollout),
                  steps, opts.k)]


def _reflow(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    if not 0 < opts.reflow_fraction < 1:
        raise ConfigError(f"reflow_fraction must lie in (0, 1), got {opts.reflow_fraction}; e.g. --options-reflow-fraction 0.5")
    first = max(1, int(round(steps * opts.reflow_fraction)))
    return [
        Phase("reflow", "pairs", lambda _: ReflowLoss(opts.time_sampler), first, teacher_steps),
        Phase("distill", "pairs", lambda _: PairDistillationLoss(opts.distance, opts.lpips_resize), max(1, steps - first), 1),
    ]


def _halving(start: int, end: int, end_flag: str) -> tuple[list[int], list[list[float]]]:
    """Step counts and time grids of progressive rounds from ``start`` Euler steps down to ``end``."""
    try:
        counts = progressive_step_counts(start, end)
    except ValueError as exc:
        raise ConfigError(f"progressive distillation from {start} to {end} steps: {exc}; pass one of those as "
                          f"{end_flag} (or another --options-progressive-start)") from None
    grids = [[i / start for i in range(start + 1)]]
    for _ in counts[1:]:
        grids.append(halve_grid(grids[-1]))
    return counts, grids


def _grid_export(grid: list[float]) -> dict[str, Any]:
    uniform = all(abs(t - i / (len(grid) - 1)) < 1e-12 for i, t in enumerate(grid))
    return {} if uniform else {"time_grid": grid}


def _progressive(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    counts, grids = _halving(opts.progressive_start, opts.progressive_end, "--options-progressive-end")
    per_round = max(1, steps // (len(counts) - 1))

    def make(grid: list[float], w: float) -> Callable[[nn.Module], nn.Module]:
        return lambda start_model: ProgressiveDistillationLoss(copy.deepcopy(start_model), grid, w)

    export = _grid_export
    # the first round queries the CFG teacher; later rounds a student that learned the guided velocity
    return [Phase(f"round{i + 1}_{n}to{m}", "images", make(grids[i], guidance if i == 0 else 1.0), per_round, m,
                  export={**export(grids[i + 1]), "progressive_round": i + 1, "teacher_steps": n})
            for i, (n, m) in enumerate(zip(counts[:-1], counts[1:], strict=True))]


def _guided(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    lo, hi = opts.guidance_min, opts.guidance_max
    GuidanceConditionedLoss(nn.Identity(), lo, hi)  # validate the range before any work

    def make(start: nn.Module) -> nn.Module:
        return GuidanceConditionedLoss(copy.deepcopy(start), lo, hi, flow.time_sampler)

    default = min(max(guidance, lo), hi)
    return [Phase("guided", "images", make, steps, teacher_steps, (lo + hi) / 2, student=with_guidance_embedding,
                  export={"guidance_range": [lo, hi], "default_guidance": default})]


def _guided_progressive(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int,
                        guidance: float) -> list[Phase]:
    """Guided distillation, both stages (Meng et al. 2023): stage one as ``guided`` (a w-conditioned student of the CFG
    teacher, sampling at --options-progressive-start steps), then stage two, progressive rounds of that student
    halving down to --options-guided-end steps, each round's target built from the previous w-conditioned model at
    the sample's own w ~ U[--options-guidance-min, --options-guidance-max]. The steps are split evenly over stage
    one and the rounds."""
    lo, hi = opts.guidance_min, opts.guidance_max
    GuidanceConditionedLoss(nn.Identity(), lo, hi)  # validate the range before any work
    counts, grids = _halving(opts.progressive_start, opts.guided_end, "--options-guided-end")
    per_phase = max(1, steps // len(counts))  # stage one + one phase per round
    w_export = {"guidance_range": [lo, hi], "default_guidance": min(max(guidance, lo), hi)}

    def stage_one(start: nn.Module) -> nn.Module:
        return GuidanceConditionedLoss(copy.deepcopy(start), lo, hi, flow.time_sampler)

    def make(grid: list[float]) -> Callable[[nn.Module], nn.Module]:
        return lambda start_model: ProgressiveDistillationLoss(copy.deepcopy(start_model), grid, guidance_range=(lo, hi))

    phases = [Phase("guided", "images", stage_one, per_phase, counts[0], (lo + hi) / 2, student=with_guidance_embedding,
                    export={**w_export, "guided_stage": 1})]
    phases += [Phase(f"round{i + 1}_{n}to{m}", "images", make(grids[i]), per_phase, m, (lo + hi) / 2,
                     export={**w_export, **_grid_export(grids[i + 1]), "guided_stage": 2, "progressive_round": i + 1,
                             "teacher_steps": n})
               for i, (n, m) in enumerate(zip(counts[:-1], counts[1:], strict=True))]
    return phases


def _dmd(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    """DMD2 (Yin et al. 2024): a one-step student of the phase-start model (the teacher's weights), which is also the
    real score (at the teacher's CFG scale) and the fake score's initial weights; see DistributionMatchingLoss."""
    kwargs = dict(fake_updates=opts.dmd_fake_updates, fake_learning_rate=opts.dmd_fake_learning_rate,
                  guidance=guidance, t_min=opts.dmd_t_min, t_max=opts.dmd_t_max, time_sampler_name=flow.time_sampler,
                  gan_weight=opts.dmd_gan_weight, gan_d_weight=opts.dmd_gan_d_weight,
                  head_channels=opts.dmd_head_channels)
    DistributionMatchingLoss(nn.Linear(1, 1), **{**kwargs, "gan_weight": 0.0})  # validate before any work

    def make(start: nn.Module) -> nn.Module:
        return DistributionMatchingLoss(start, **kwargs)

    return [Phase("dmd", "images", make, steps, 1)]


def _adversarial(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    """ADD on the pairs (the teacher's multi-step samples) against real images; the phase-start model (the teacher's
    weights) is the discriminator's frozen feature network."""

    def make(start: nn.Module) -> nn.Module:
        return AdversarialDistillationLoss(start, opts.adv_steps, opts.adv_weight, opts.adv_d_learning_rate,
                                           opts.adv_r1_weight, opts.adv_head_channels)

    return [Phase("adversarial", "pairs+images", make, steps, opts.adv_steps)]


def _consistency(opts: RecipeConfig, flow: FlowConfig, steps: int, teacher_steps: int, guidance: float) -> list[Phase]:
    """Consistency distillation with the phase-start model (the teacher's weights) as frozen teacher and target init;
    the teacher's ODE steps use its CFG scale."""
    if opts.cd_steps < 1:
        raise ConfigError(f"consistency sampling needs >= 1 step, got {opts.cd_steps}; pass --options-cd-steps 2")

    def make(start: nn.Module) -> nn.Module:
        return ConsistencyDistillationLoss(start, start, opts.cd_grid, opts.cd_target_decay, opts.cd_solver, guidance,
                                           opts.distance, opts.lpips_resize)

    return [Phase("consistency", "images", make, steps, opts.cd_steps, sampler="consistency")]


RECIPES: dict[str, Callable[..., list[Phase]]] = {
    "teacher": _teacher,
    "one_step": _one_step,
    "k_step": _k_step,
    "reflow": _reflow,
    "progressive": _progressive,
    "adversarial": _adversarial,
    "consistency": _consistency,
    "guided": _guided,
    "dmd": _dmd,
    "guided_progressive": _guided_progressive,
}


def build_recipe(name: str, options: RecipeConfig, flow: FlowConfig, steps: int, *, teacher_steps: int = 32,
                 guidance: float = 1.0) -> list[Phase]:
    """The phases of recipe ``name`` splitting ``steps`` optimiser steps."""
    name = RENAMED_RECIPES.get(name, name)  # "four_step" is the old name of k_step
    if name not in RECIPES:
        raise unknown_choice("recipe", name, RECIPES)
    return RECIPES[name](options, flow, steps, teacher_steps, guidance)


def recipe_data_kinds(phases: list[Phase]) -> set[str]:
    """The data sets the phases read; a compound kind ("pairs+images") names each of its parts."""
    return {part for p in phases for part in p.data.split("+")}


def combine_data(phases: list[Phase], data: dict[str, TrainingData]) -> dict[str, TrainingData]:
    """Add the compound data sets the phases read (e.g. "pairs+images") to ``data`` built from their parts."""
    from distill_rf_cifar.training.data import PairsWithImages

    out = dict(data)
    for p in phases:
        if p.data == "pairs+images" and p.data not in out and {"pairs", "images"} <= set(out):
            out[p.data] = PairsWithImages(out["pairs"], out["images"])
    return out


class _PhaseCallback(TrainingCallback):
    """Forward a phase's reports with its global step offset. With several phases (progressive rounds, reflow's two
    parts) every metric is reported twice: under its own key, one curve across all phases on the global step (with
    ``phase``, the 1-based phase number, beside it), and under ``<phase>/<key>`` for each phase alone."""

    def __init__(self, inner: TrainingCallback, offset: int, prefix: str, index: int = 0) -> None:
        self.inner, self.offset, self.prefix, self.index = inner, offset, prefix, index

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        out = dict(metrics)
        if self.prefix:
            out.update({f"{self.prefix}{k}": v for k, v in metrics.items()})
            out["phase"] = float(self.index + 1)
        self.inner.on_metrics(self.offset + step, out)

    def on_samples(self, step: int, images: torch.Tensor) -> None:
        self.inner.on_samples(self.offset + step, images)

    def on_checkpoint(self, step: int, folder: Path) -> None:
        self.inner.on_checkpoint(self.offset + step, folder)


@dataclass
class RecipeRun:
    model: nn.Module  # EMA weights of the last finished phase
    finished: bool
    results: list[TrainResult]
    last_phase: Phase


def run_recipe(
    phases: list[Phase],
    model: nn.Module,
    loop: LoopConfig,
    data: dict[str, TrainingData],
    output_dir: str | Path,
    *,
    callback: TrainingCallback | None = None,
    sample_fn: Callable[[Phase], SampleFn] | None = None,
    progress: bool = True,
) -> RecipeRun:
    """Run the phases in order; a finished phase (``<phase>/final/model.safetensors``) is loaded, not retrained.

    ``loop.stop_at_step`` counts steps over all phases.
    """
    out = Path(output_dir)
    callback = callback or TrainingCallback()
    data = combine_data(phases, data)
    offset, results = 0, []
    for i, phase in enumerate(phases):
        folder = out / phase.name
        final = folder / FINAL / MODEL_FILE
        if phase.student is not None:
            start_model = model  # the teacher of a loss built from it
            model = phase.student(model)
        if final.is_file():
            ckpt.load_into(model, final, "model")
            offset += phase.steps
            continue
        stop = loop.stop_at_step
        if stop is not None and stop <= offset:
            return RecipeRun(model, False, results, phase)
        cfg = dataclasses.replace(loop, steps=phase.steps, seed=loop.seed + i,
                                  stop_at_step=None if stop is None else stop - offset)
        if phase.data not in data:
            raise ConfigError(f"phase {phase.name!r} needs {phase.data} data, which was not provided")
        loss = phase.make_loss(start_model if phase.student is not None else model)
        result, model, ema = train(cfg, model, loss, data[phase.data], folder,
                                   callback=_PhaseCallback(callback, offset, f"{phase.name}/" if len(phases) > 1 else "", i),
                                   sample_fn=sample_fn(phase) if sample_fn else None, progress=progress,
                                   description=phase.name)
        results.append(result)
        if not result.finished:
            return RecipeRun(model, False, results, phase)
        ema.copy_to(model)
        final.parent.mkdir(parents=True, exist_ok=True)
        ckpt.save_weights(model.state_dict(), final)
        offset += phase.steps
    return RecipeRun(model, True, results, phases[-1])
