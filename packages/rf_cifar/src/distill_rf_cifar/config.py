"""Typed configs of every ``distill rf`` command, and the three scales they come in (smoke, cpu, paper).

One preset table (:data:`SCALES`) is the single source of the numbers: each command's preset is cut
from the pipeline preset of the same name, so ``train-teacher --preset cpu`` trains exactly the
teacher that ``pipeline --preset cpu`` trains.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from distill_common.config import TRACKING_URI_HELP, FlagNamer, nested, option
from distill_common.errors import ConfigError
from distill_eval.protocol import FEATURE_PRECISIONS

DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SAMPLER_NAMES = ("euler", "heun", "rk45", "consistency")
SAMPLE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of generation (distill_common.runtime.resolve_precision)
TIME_SAMPLER_NAMES = ("uniform", "logit_normal")
RECIPE_NAMES = ("teacher", "one_step", "k_step", "reflow", "progressive",
                "adversarial", "consistency", "guided", "dmd", "guided_progressive")
# Old recipe names, still accepted with a note: "four_step" was the k-step recipe, which made "four-step" mean two
# things (the recipe, and the pipeline's four-step student, which is progressive by default).
RENAMED_RECIPES = {"four_step": "k_step"}
DISTANCES = ("l2", "lpips")
DATA_SOURCES = ("shards", "folder", "hub")
LR_SCHEDULES = ("constant_with_warmup", "linear", "cosine")
COMPARE_BUDGETS = ("steps", "wall_clock")


@dataclass
class UNetConfig:
    """The denoiser: diffusers' ``UNet2DModel`` (Ho et al. 2020 layout) with a class embedding."""

    base_channels: int = option(64, "Channels of the first level; level i has base_channels * channel_mults[i].", ge=1)
    channel_mults: list[int] = option([1, 1, 2], "Channel multiplier per resolution level (32, 16, 8, ...).", ge=1)
    res_blocks: int = option(1, "Residual blocks per level (the up path has one more, as in DDPM).", ge=1)
    attention_resolutions: list[int] = option([16], "Resolutions whose blocks get self-attention (empty: none).")
    mid_attention: bool = option(True, "Self-attention in the middle block (lowest resolution).")
    dropout: float = option(0.1, "Dropout in the residual blocks (DDPM's CIFAR-10 value).", ge=0, lt=1)
    norm_groups: int = option(32, "GroupNorm groups; must divide every level's channel count.", ge=1)
    num_classes: int = option(10, "Class labels (0 = unconditional); one extra 'null' class serves CFG.", ge=0)

    def validate(self, flag: FlagNamer = FlagNamer(("model",))) -> None:
        if self.base_channels < 1 or not self.channel_mults or self.res_blocks < 1:
            raise ConfigError(f"the UNet needs {flag('base_channels')} >= 1, {flag('res_blocks')} >= 1 and at least "
                              f"one {flag('channel_mults')} value")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ConfigError(
                    f"GroupNorm groups {self.norm_groups} do not divide {self.base_channels * m} channels; "
                    f"pass {flag('norm_groups')} with a divisor of every level's width (e.g. 8)"
                )
        levels = [32 // 2**i for i in range(len(self.channel_mults))]
        bad = [r for r in self.attention_resolutions if r not in levels]
        if bad:
            raise ConfigError(f"{flag('attention_resolutions')} {bad} are not levels of this UNet ({levels}); "
                              "pick from those")


@dataclass
class FlowConfig:
    """Rectified flow (Liu et al. 2023): how the teacher draws t and drops labels."""

    time_sampler: str = option("logit_normal", "How training draws t: uniform, or logit-normal (SD3, minRF).",
                               choices=TIME_SAMPLER_NAMES)
    label_dropout: float = option(0.1, "Probability of replacing the label by the null class (CFG training).",
                                  ge=0, le=1)


@dataclass
class DataConfig:
    """Where CIFAR-10 comes from."""

    data_root: Path | None = option(None, "Data root holding cifar10/ (default: $DISTILL_DATA_ROOT, then "
                                    "../shared/data next to the repository).")
    source: str = option("shards", "CIFAR-10 source: WebDataset shards, an image folder, or the Hub.",
                         choices=DATA_SOURCES)
    limit: int | None = option(None, "Use only the first N training images (default: all 50,000).", ge=1)
    random_flip: bool = option(True, "Random horizontal flips (Ho et al. 2020, App. B).")
    strict: bool = option(False, "Refuse unreadable images of a folder source (default: skip and count them).")

    def validate(self, flag: FlagNamer) -> None:
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise ConfigError(f"{flag('data_root')} {self.data_root} does not exist; pass the folder that holds "
                              "cifar10/ (or leave it out: $DISTILL_DATA_ROOT, then ../shared/data)")

    def resolved_root(self) -> Path | None:
        if self.data_root is not None:
            return self.data_root
        env = os.environ.get("DISTILL_DATA_ROOT")
        return Path(env) if env else None


@dataclass
class LoopConfig:
    """The one training loop (``training.loop.train``): optimiser, schedule, EMA, checkpoints, logging."""

    steps: int = option(1000, "Optimiser steps of this run.", ge=1)
    batch_size: int = option(64, "Images per optimiser step.", ge=1)
    learning_rate: float = option(2e-4, "Peak learning rate of AdamW (DDPM: 2e-4).", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0)
    warmup_steps: int = option(100, "Linear learning-rate warm-up steps.", ge=0)
    lr_schedule: str = option("constant_with_warmup", "Learning-rate schedule after warm-up (diffusers names).",
                              choices=LR_SCHEDULES)
    grad_clip: float = option(1.0, "Clip the gradient norm to this value (0 = off).", ge=0)
    ema_decay: float = option(0.9999, "EMA decay cap; the decay warms up as (1+n)/(10+n), so short runs still average.",
                              ge=0, lt=1)
    precision: str = option("auto", "Mixed precision through Accelerate (auto: fp16 on CUDA, bf16 on CPUs with bf16 units, else fp32).",
                            choices=PRECISIONS)
    device: str = option("auto", "Device.", choices=DEVICES)
    seed: int = option(0, "Seed of weights-independent randomness: data order, t, noise, dropout.")
    checkpoint_every: int = option(500, "Write a resumable checkpoint every N steps (and at the end).", ge=1)
    keep_checkpoints: int = option(2, "Checkpoints kept on disk (0 = all).", ge=0)
    log_every: int = option(25, "Report loss (overall and per t-bin) every N steps.", ge=1)
    sample_every: int = option(0, "Log a sample grid every N steps (0 = only at the end).", ge=0)
    time_bins: int = option(4, "Bins of t for the per-t-bin loss.", ge=1)
    stop_at_step: int | None = option(None, "Stop (with a checkpoint) at this step without finishing, as a kill would; "
                                      "a later run resumes.", ge=1)
    log_checkpoints: bool = option(True, "Log each checkpoint's weights to MLflow as artifacts.")

    def validate(self, flag: FlagNamer = FlagNamer(("train",))) -> None:
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError(f"precision fp16 is not supported on the CPU; pass {flag('precision')} bf16 or fp32")


@dataclass
class SamplingConfig:
    """How a generator samples by default."""

    sampler: str = option("euler", "ODE solver.", choices=SAMPLER_NAMES)
    steps: int = option(32, "Default number of steps (ignored by rk45).", ge=1)
    guidance: float = option(1.0, "Classifier-free guidance scale w: v = v_u + w (v_c - v_u); 1 = conditional only.", ge=0)
    rtol: float = option(1e-3, "RK45 relative tolerance (Liu et al. use 1e-3 for CIFAR-10).", gt=0)
    atol: float = option(1e-3, "RK45 absolute tolerance.", gt=0)


@dataclass
class TeacherConfig:
    """``distill rf train-teacher``."""

    output_dir: Path = option(Path("runs/rf_cifar/teacher"), "Run folder: checkpoints/, generator/, samples.")
    model: UNetConfig = nested(UNetConfig, "The UNet.")
    flow: FlowConfig = nested(FlowConfig, "Rectified flow.")
    train: LoopConfig = nested(LoopConfig, "Training loop.")
    data: DataConfig = nested(DataConfig, "CIFAR-10.")
    sampling: SamplingConfig = nested(SamplingConfig, "Default sampling of the exported generator.")
    experiment: str = option("rf_cifar", "MLflow experiment.")
    run_name: str = option("teacher", "MLflow run name.")
    track: bool = option(True, "Log to MLflow.")
    init: str = option("scratch", "Initial weights: 'scratch' (random), 'reference' (warm start from the shipped "
                       "reference teacher) or a generator folder / runs:/ / models:/ URI; a warm start takes that "
                       "generator's architecture (--model-* are ignored). A run folder with checkpoints resumes from "
                       "its full state whatever --init says.")



@dataclass
class PairsConfig:
    """``distill rf make-pairs``: (noise, image, label, seed) from the teacher's ODE."""

    teacher: Path = option(Path("runs/rf_cifar/teacher/generator"), "Teacher generator folder.")
    output_dir: Path = option(Path("runs/rf_cifar/pairs"), "Folder of pair shards and manifest.json.")
    num_pairs: int = option(1024, "Pairs in total; seeds seed_start .. seed_start + num_pairs - 1.", ge=1)
    shard_size: int = option(512, "Pairs per safetensors shard (the unit of resume).", ge=1)
    seed_start: int = option(1_000_000, "First seed (kept apart from evaluation seeds 0..N).", ge=0)
    sampler: str = option("euler", "Teacher ODE solver.", choices=SAMPLER_NAMES)
    steps: int = option(16, "Teacher steps (euler/heun).", ge=1)
    guidance: float = option(1.0, "Teacher CFG scale baked into the pairs.", ge=0)
    rtol: float = option(1e-3, "RK45 relative tolerance.", gt=0)
    atol: float = option(1e-3, "RK45 absolute tolerance.", gt=0)
    batch_size: int = option(256, "Pairs generated per batch.", ge=1)
    precision: str = option("auto", "Precision of the teacher's forwards (autocast; the ODE state stays fp32): auto = "
                            "bf16 on CPUs with bf16 units, fp16 on CUDA, else fp32. Recorded in the manifest.",
                            choices=SAMPLE_PRECISIONS)
    storage_dtype: str = option("float32", "dtype of stored noise and images.", choices=("float32", "float16"))
    device: str = option("auto", "Device.", choices=DEVICES)
    experiment: str = option("rf_cifar", "MLflow experiment.")
    track: bool = option(True, "Log to MLflow.")



@dataclass
class RecipeConfig:
    """Options of the student recipes (which ones a recipe reads is listed in recipes.py)."""

    k: int = option(4, "Steps of the k-step student (four_step).", ge=1)
    target_guidance: float | None = option(None, "CFG scale of the teacher's targets in the recipes that query it "
                                           "(progressive, consistency; guided's default scale) (default: the "
                                           "teacher's own default guidance).", ge=0)
    k_rollout: float = option(0.0, "four_step: share of the samples trained from the state the student's own Euler "
                              "steps reach (target: the velocity to the teacher's image from there) instead of the "
                              "pair's straight line; counters exposure bias.", ge=0, le=1)
    distance: str = option("l2", "One-step loss: L2 on the velocity, or LPIPS on the predicted image "
                           "(Liu et al. use LPIPS for the one-step student).", choices=DISTANCES)
    lpips_resize: int = option(224, "Upsample to this size before LPIPS (as Liu et al.; 0 = native 32 px).", ge=0)
    reflow_fraction: float = option(0.5, "reflow recipe: share of the steps spent on 2-RF before the one-step distill.",
                                    ge=0, le=1)
    progressive_start: int = option(32, "progressive: the teacher's Euler steps in the first round (any count; odd "
                                    "counts halve rounding up: 1000 -> 500 -> 250 -> 125 -> 63 -> 32 -> 16 -> 8).", ge=1)
    progressive_end: int = option(4, "progressive: the student's steps after the last round (halving each round; "
                                  "must be on the start's halving chain).", ge=1)
    time_sampler: str = option("uniform", "reflow recipe: how t is drawn.", choices=TIME_SAMPLER_NAMES)
    # -- adversarial (ADD, Sauer et al. 2023) and consistency (Song et al. 2023) recipes
    adv_steps: int = option(4, "adversarial: student steps (1-4); training draws t from that many fixed Euler points.",
                           ge=1, le=4)
    adv_weight: float = option(0.5, "adversarial: lambda of lambda * ||x_student - x_teacher||^2 (the tutorial's 0.5).", ge=0)
    adv_d_learning_rate: float = option(1e-5, "adversarial: Adam learning rate of the discriminator heads (tutorial: "
                                        "1e-5 for both networks; the student's is --train-learning-rate).", gt=0)
    adv_r1_weight: float = option(0.003, "adversarial: R1 penalty gamma on real images, gamma/2 E||grad D||^2 "
                                  "(StyleGAN2's 2e-4 * res^2 / batch at 32 px, batch 64).", ge=0)
    adv_head_channels: int = option(32, "adversarial: hidden channels of each discriminator head.", ge=1)
    cd_grid: int = option(16, "consistency: intervals of the uniform time grid (16 holds the 1-, 2-, 4- and 8-step "
                          "sampling times; Song et al. use 18 points of EDM's grid).", ge=1)
    cd_target_decay: float = option(0.95, "consistency: EMA decay mu of the target network (Song et al., CIFAR-10 CD).", ge=0, lt=1)
    cd_solver: str = option("euler", "consistency: the teacher's one ODE step between grid points (Song et al.: Heun).",
                            choices=("euler", "heun"))
    cd_steps: int = option(2, "consistency: the student's default sampling steps (multistep consistency sampling).", ge=1)
    # guided (Meng et al. 2023, stage one)
    guidance_min: float = option(1.0, "guided: lowest CFG scale w the student learns (w ~ U[min, max] per sample).", ge=0)
    guidance_max: float = option(8.0, "guided: highest CFG scale w the student learns.", ge=0)

    # dmd (DMD2, Yin et al. 2024): one-step student, frozen teacher = real score, online fake score
    dmd_fake_updates: int = option(5, "dmd: fake-score optimiser steps per student step (DMD2's two time-scale "
                                   "update rule: 5).", ge=1, le=100)
    dmd_fake_learning_rate: float = option(2e-4, "dmd: AdamW learning rate of the fake score network (and GAN head).",
                                           gt=0, le=1)
    dmd_t_min: float = option(0.02, "dmd: lowest t of the noised student sample the scores are compared at "
                              "(t = 0 noise, t = 1 data; DMD: 0.02 T .. 0.98 T).", ge=0, lt=1)
    dmd_t_max: float = option(0.98, "dmd: highest t of that noised sample.", gt=0, le=1)
    dmd_gan_weight: float = option(0.0, "dmd: weight of the student's non-saturating GAN loss on real CIFAR-10 images "
                                   "(0 = off; DMD2 uses 3e-3 with its per-pixel-mean DMD loss, as here).", ge=0, le=1000)
    dmd_gan_d_weight: float = option(0.01, "dmd: weight of the GAN head's classification loss in each fake-score step "
                                     "(DMD2: 1e-2).", ge=0, le=1000)
    dmd_head_channels: int = option(32, "dmd: hidden channels of the GAN head on the fake network's bottleneck.",
                                    ge=1, le=4096)
    # guided_progressive (Meng et al. 2023, stage two)
    guided_end: int = option(4, "guided_progressive: the w-conditioned student's steps after stage two (halving from "
                             "--options-progressive-start; must be on its halving chain).", ge=1, le=4096)

    def validate(self, flag: FlagNamer = FlagNamer(("options",))) -> None:
        if self.guidance_min > self.guidance_max:
            raise ConfigError(f"{flag('guidance_min')} {self.guidance_min:g} is above {flag('guidance_max')} "
                              f"{self.guidance_max:g}; pass a range with min <= max (e.g. 1 and 8)")


@dataclass
class RoundsEvalConfig:
    """progressive: FID of every round's student at its own step count, and of the teacher at the same steps."""

    num_images: int = option(500, "Generated images per configuration (seeds 0..N-1, class = seed % 10; 0 = export "
                             "the rounds without evaluating them).", ge=0)
    reference: str = option("cifar10-train", "FID reference set (distill_eval.reference_stats).")
    reference_n: int | None = option(10_000, "Reference images (default: all of the set).", ge=2)
    batch_size: int = option(250, "Generation batch size.", ge=1)
    teacher: bool = option(True, "Also evaluate the teacher (Euler) at every round's step count.")
    feature_precision: str = option("fp32", "Inception forward precision (stamped in the protocol; bf16 about 2x "
                                    "faster on CPUs with bf16 units; +compile: under torch.compile, 1.34x).",
                                    choices=FEATURE_PRECISIONS)


@dataclass
class DistillConfig:
    """``distill rf distill``: a student from the teacher's weights by a named recipe."""

    recipe: str = option("k_step", "Student recipe.", choices=RECIPE_NAMES[1:], renamed=RENAMED_RECIPES)
    teacher: Path = option(Path("runs/rf_cifar/teacher/generator"), "Teacher generator folder (its weights start "
                           "the student; progressive also queries it).")
    pairs: Path = option(Path("runs/rf_cifar/pairs"), "Pair folder (one_step, four_step, reflow).")
    output_dir: Path | None = option(None, "Run folder (default: runs/rf_cifar/students/<recipe>).")
    options: RecipeConfig = nested(RecipeConfig, "Recipe options.")
    train: LoopConfig = nested(LoopConfig, "Training loop.")
    data: DataConfig = nested(DataConfig, "CIFAR-10 (progressive and guided recipes).")
    rounds: RoundsEvalConfig = nested(RoundsEvalConfig, "progressive: evaluation of every round.")
    experiment: str = option("rf_cifar", "MLflow experiment.")
    run_name: str | None = option(None, "MLflow run name (default: distill-<recipe>).")
    track: bool = option(True, "Log to MLflow.")

    @property
    def folder(self) -> Path:
        return self.output_dir or Path("runs/rf_cifar/students") / self.recipe


@dataclass
class SampleConfig:
    """``distill rf sample``: PNGs and a grid from a generator."""

    generator: str = option("reference", "Generator: 'reference' (the shipped CIFAR-10 teacher), a generator folder, "
                            "runs:/ID/PATH or models:/NAME@ALIAS.")
    classes: list[int] = option(list(range(10)), "Class labels to draw.", ge=0)
    per_class: int = option(8, "Images per class (seeds seed, seed+1, ...).", ge=1)
    steps: int | None = option(None, "Steps (default: the generator's own).", ge=1)
    sampler: str | None = option(None, "ODE solver (default: the generator's own).", choices=SAMPLER_NAMES)
    guidance: float | None = option(None, "CFG scale (default: the generator's own).", ge=0)
    seed: int = option(0, "First seed.")
    precision: str = option("auto", "Precision of the forwards (autocast): auto = bf16 on CPUs with bf16 units, fp16 "
                            "on CUDA, else fp32.", choices=SAMPLE_PRECISIONS)
    output_dir: Path = option(Path("runs/rf_cifar/samples"), "Where the PNGs and grid.png go.")
    device: str = option("auto", "Device.", choices=DEVICES)
    tracking_uri: str | None = option(None, TRACKING_URI_HELP)


SDS_PARAMETRISATIONS = ("pixels", "tanh")
SDS_WEIGHTINGS = ("uniform", "noise_variance")


@dataclass
class SDSConfig:
    """``distill rf sds``: score distillation sampling (Poole et al. 2022), the 2D exercise: optimise images of one
    class from noise with the teacher's score, for a sweep of guidance scales, and measure their diversity."""

    teacher: str = option("reference", "Teacher: 'reference' (the shipped CIFAR-10 teacher), a generator folder or a "
                          "runs:/ / models:/ URI.")
    class_label: int = option(3, "CIFAR-10 class of the images (0 airplane ... 9 truck).", ge=0, le=9)
    seeds: int = option(8, "Images per guidance scale: seed i draws image i's initial noise and its SDS noise.")
    guidance_scales: list[float] = option([1.0, 7.5, 30.0, 100.0], "CFG scales to sweep (DreamFusion uses 100).", ge=0)
    iterations: int = option(400, "Optimiser steps per image.", ge=1)
    learning_rate: float = option(0.03, "Adam learning rate (cosine-decayed to 0, so the last images are not noisy).", gt=0)
    parametrisation: str = option("pixels", "The optimised variable: the pixels themselves (clamped to [-1, 1]) or "
                                  "theta with image = tanh(theta).", choices=SDS_PARAMETRISATIONS)
    weighting: str = option("uniform", "w(t): uniform, or noise_variance (1 - t)^2 (DreamFusion's sigma_t^2).",
                            choices=SDS_WEIGHTINGS)
    t_min: float = option(0.02, "Lowest t drawn (t = 0 is pure noise); t ~ U[t_min, t_max].", gt=0, lt=1)
    t_max: float = option(0.98, "Highest t drawn (t = 1 is the image itself).", gt=0, lt=1)
    snapshots: int = option(8, "Columns of the trajectory grid (evenly spaced iterations, first and last included).", ge=2)
    teacher_steps: int | None = option(None, "Euler steps of the teacher samples the diversity is compared with "
                                       "(default: the teacher's own).", ge=1)
    lpips_net: str = option("alex", "LPIPS network of the diversity measure.", choices=("alex", "vgg"))
    output_dir: Path = option(Path("runs/rf_cifar/sds"), "Grids, final images and the diversity table.")
    device: str = option("auto", "Device.", choices=DEVICES)
    experiment: str = option("rf_cifar", "MLflow experiment.")
    run_name: str = option("sds", "MLflow run name.")
    track: bool = option(True, "Log to MLflow.")

    def validate(self) -> None:
        if self.seeds < 2:
            raise ConfigError(f"diversity needs at least 2 images per scale, got --seeds {self.seeds}; pass --seeds 8")
        if self.iterations < 1 or self.snapshots < 2 or not self.guidance_scales:
            raise ConfigError("sds needs --iterations >= 1, --snapshots >= 2 and at least one --guidance-scales value")
        if not 0.0 < self.t_min < self.t_max < 1.0:
            raise ConfigError(f"t must be drawn strictly inside (0, 1), got [{self.t_min}, {self.t_max}]; "
                              "pass e.g. --t-min 0.02 --t-max 0.98")


@dataclass
class EvalConfig:
    """The FID-vs-NFE sweep."""

    teacher_steps: list[int] = option([1, 2, 4, 8, 16, 32, 100], "Teacher Euler step counts.", ge=1)
    teacher_rk45: bool = option(True, "Also evaluate the teacher with the adaptive RK45 solve.")
    student_steps: list[int] = option([1, 2, 4], "Student step counts.", ge=1)
    students_at_own_steps: bool = option(False, "Score each student only at the step count it was distilled for "
                                         "(its generator.json default), not at every --eval-student-steps value.")
    num_images: int = option(1000, "Generated images per configuration (seeds 0..N-1, classes cycling 0..9).", ge=2)
    reference: str = option("cifar10-train", "FID reference set (distill_eval.reference_stats).")
    reference_n: int | None = option(10_000, "Reference images (default: all of the set).", ge=2)
    batch_size: int = option(250, "Generation batch size.", ge=1)
    timing_batch: int = option(64, "Batch of the latency measurement.", ge=1)
    timing_repeats: int = option(3, "Timed batches per configuration, after one warm-up batch.", ge=1)
    grid_classes: int = option(10, "Rows (classes) of the comparison grid.", ge=1)
    feature_precision: str = option("fp32", "Inception forward precision: fp32, or bf16 (about 2x faster on CPUs "
                                    "with bf16 units; part of the FID protocol); +compile: under torch.compile, 1.34x, "
                                    "worth it from a few hundred images.", choices=FEATURE_PRECISIONS)
    sample_precision: str = option("auto", "Precision of every model's forwards while generating (autocast, ODE state "
                                   "fp32): auto = bf16 on CPUs with bf16 units, fp16 on CUDA, else fp32; one precision "
                                   "for all rows, stamped in the report.", choices=SAMPLE_PRECISIONS)
    bootstrap_resamples: int = option(200, "Bootstrap resamples of the generated images for each FID's 95% "
                                      "interval (FID ± 1.96 bootstrap SE, seed 0; 0 = no interval).", ge=0)
    class_accuracy: bool = option(True, "Class accuracy of every configuration: the share of images that "
                                  "distill_eval's CIFAR-10 classifier assigns to their class, with a 95% Wilson "
                                  "interval (skipped with a note when the classifier's weights are missing).")
    classifier: str = option("reference", "The classifier: 'reference' (shipped with distill-eval) or a folder "
                             "written by distill_eval.classifier.save_classifier.")


@dataclass
class EvaluateConfig:
    """``distill rf evaluate``: teacher and students on one protocol."""

    teacher: str = option("reference", "Teacher: 'reference' (the shipped CIFAR-10 teacher), a generator folder or "
                          "a runs:/ / models:/ URI.")
    students: list[str] = option([], "Students as LABEL=FOLDER_OR_URI (e.g. four_step=runs/rf_cifar/students/four_step/generator).")
    eval: EvalConfig = nested(EvalConfig, "Sweep.")
    output_dir: Path = option(Path("runs/rf_cifar/eval"), "Images, report, grid and plots.")
    data_root: Path | None = option(None, "Data root (default: $DISTILL_DATA_ROOT).")
    device: str = option("auto", "Device.", choices=DEVICES)
    experiment: str = option("rf_cifar", "MLflow experiment.")
    track: bool = option(True, "Log to MLflow.")


@dataclass
class RegistryConfig:
    """Where the pipeline registers its models and how it picks the champion."""

    teacher_name: str = option("rf_cifar-teacher", "Registered model of teachers (champion: best FID at any steps).")
    student_name: str = option("rf_cifar-student", "Registered model of students (champion: best FID at <= max_steps).")
    max_steps: int = option(4, "Champion gate: only step counts up to this compete.", ge=1)
    register: bool = option(True, "Register and promote (needs tracking).")


@dataclass
class PipelineConfig:
    """``distill rf pipeline``: teacher → pairs → four-step and one-step students → FID/time → registry."""

    run_name: str = option("smoke", "Name of this pipeline run (default folder runs/rf_cifar/<run-name>).")
    output_dir: Path | None = option(None, "Output folder (default: runs/rf_cifar/<run-name>).")
    teacher_source: str = option("reference", "Teacher to distil: 'reference' (the CIFAR-10 teacher shipped with this "
                                 "package, see its MODEL_CARD.md), 'scratch' (train one with the --teacher-* options "
                                 "and --model-*), or a generator folder / runs:/ / models:/ URI.",
                                 aliases=("--teacher",))
    data: DataConfig = nested(DataConfig, "CIFAR-10.")
    model: UNetConfig = nested(UNetConfig, "The UNet of --teacher scratch (other teachers bring theirs; students "
                               "take the teacher's).")
    flow: FlowConfig = nested(FlowConfig, "Rectified flow.")
    teacher: LoopConfig = nested(LoopConfig, "Teacher training (--teacher scratch only).")
    sampling: SamplingConfig = nested(SamplingConfig, "Default sampling of a --teacher scratch teacher.")
    pairs: PairsConfig = nested(PairsConfig, "Pair generation (teacher/output_dir are set by the pipeline).")
    four_step_recipe: str = option("k_step", "How the four-step student is distilled: 'k_step' (k-step "
                                   "distillation on the pairs, Liu et al. 2023) or 'progressive' (Salimans & Ho 2022: "
                                   "rounds on CIFAR-10 images from --options-progressive-start, the teacher's default "
                                   "steps, halving down to --options-progressive-end = --options-k).",
                                   choices=("k_step", "progressive"), renamed=RENAMED_RECIPES)
    four_step: LoopConfig = nested(LoopConfig, "Four-step student training.")
    one_step: LoopConfig = nested(LoopConfig, "One-step student training.")
    options: RecipeConfig = nested(RecipeConfig, "Recipe options.")
    eval: EvalConfig = nested(EvalConfig, "FID-vs-NFE sweep.")
    registry: RegistryConfig = nested(RegistryConfig, "Model registry.")
    device: str = option("auto", "Device of every stage.", choices=DEVICES)
    experiment: str = option("rf_cifar", "MLflow experiment.")
    track: bool = option(True, "Log to MLflow (and register; --no-track skips the registry).")

    @property
    def folder(self) -> Path:
        return self.output_dir or Path("runs/rf_cifar") / self.run_name

    def dry_run_text(self) -> str:
        """The configuration that will run: with a given teacher (not ``scratch``) the sections that only build and
        train a teacher (model, teacher, sampling) are left out and the teacher's own UNet is named instead."""
        import json

        import yaml

        from distill_common.config import to_dict

        data = to_dict(self)
        if self.teacher_source == "scratch":
            return yaml.safe_dump(data, sort_keys=False)
        for unused in ("model", "teacher", "sampling"):
            data.pop(unused)
        lines = [f"# teacher: {self.teacher_source}, not trained in this run; --model-*, --teacher-* and --sampling-* "
                 "apply only to --teacher scratch"]
        if "://" not in self.teacher_source:
            from distill_common.generator import resolve_generator_folder

            folder = resolve_generator_folder(self.teacher_source)
            info = json.loads((folder / "generator.json").read_text())
            unet = (folder / "model_config.json")
            arch = json.loads(unet.read_text()) if unet.is_file() else {}
            lines.append(f"# the teacher's (and students') UNet: {folder}: {info.get('parameters', '?'):,} parameters, "
                         f"{json.dumps(arch)}; default sampling {info.get('sampler')} {info.get('default_steps')} "
                         f"steps at guidance {info.get('default_guidance')}")
        return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)

    def validate(self) -> None:
        if self.four_step_recipe == "progressive" and self.options.progressive_end != self.options.k:
            raise ConfigError(f"the pipeline's progressive four-step student must end at --options-k = "
                              f"{self.options.k} steps, got --options-progressive-end {self.options.progressive_end}; "
                              f"pass --options-progressive-end {self.options.k}")


# ----------------------------------------------------------------------------------------------- presets


DEMO_GUIDANCE = 2.0  # the reference teacher's best CFG scale (MODEL_CARD.md), baked into the demo's pairs


def _loop(**kw) -> LoopConfig:
    return dataclasses.replace(LoopConfig(), **kw)


def smoke_pipeline() -> PipelineConfig:
    """The main job (``make demo``, budget 10 min on 2 CPU cores): distil the shipped reference teacher
    (``--teacher reference``, 1.54M parameters, see reference_teacher/MODEL_CARD.md) into a four-step student by
    progressive distillation (16 -> 8 -> 4 Euler steps at the teacher's guidance 2, 150 steps of batch 32 per round on
    CIFAR-10 images) and a one-step student from 640 teacher pairs (Euler 8 steps at guidance 2, 100 steps of batch 64);
    bf16 autocast wherever the CPU has bf16 units; FID with 95% bootstrap intervals on 360 images per configuration
    against 1,000 CIFAR-10 training images (bf16 Inception features, stamped in the protocol): the teacher at 1/2/4
    steps and at its default (best) setting, each student at its own step count. Sized so that a machine with no
    cache (the reference statistics computed on the way) stays inside 10 min on 2 cores: Inception at ~18 images/s
    is the largest cost.

    ``--teacher scratch`` instead trains a 264k-parameter teacher for 600 steps first (minutes, blobs, not CIFAR)."""
    cfg = PipelineConfig(run_name="smoke")
    cfg.model = UNetConfig(base_channels=16, channel_mults=[1, 2, 2], res_blocks=1, attention_resolutions=[],
                           mid_attention=False, dropout=0.0, norm_groups=8)
    cfg.flow = FlowConfig(time_sampler="logit_normal", label_dropout=0.1)
    cfg.data = DataConfig(limit=None)
    cfg.teacher = _loop(steps=600, batch_size=64, learning_rate=2e-3, warmup_steps=50, ema_decay=0.999,
                        checkpoint_every=200, log_every=10, sample_every=200)
    cfg.sampling = SamplingConfig(sampler="euler", steps=16, guidance=1.0)
    cfg.pairs = PairsConfig(num_pairs=640, shard_size=320, steps=8, guidance=DEMO_GUIDANCE, batch_size=64)
    cfg.four_step_recipe = "progressive"  # 92.7 vs k_step's 101.0 at 4 steps under one budget (distill rf compare)
    cfg.four_step = _loop(steps=150, batch_size=32, learning_rate=5e-4, warmup_steps=10, ema_decay=0.99,
                          checkpoint_every=75, log_every=5)
    cfg.one_step = _loop(steps=100, batch_size=64, learning_rate=5e-4, warmup_steps=20, ema_decay=0.99,
                         checkpoint_every=50, log_every=5, seed=1)
    cfg.options = RecipeConfig(k=4, distance="l2", progressive_start=16, progressive_end=4)
    cfg.eval = EvalConfig(teacher_steps=[1, 2, 4], teacher_rk45=False, student_steps=[1, 2, 4],
                          students_at_own_steps=True, num_images=360, reference="cifar10-train", reference_n=1000,
                          batch_size=64, timing_batch=64, timing_repeats=2, feature_precision="bf16",
                          bootstrap_resamples=100)
    return cfg


def cpu_pipeline() -> PipelineConfig:
    """About an hour on 2 CPU cores (estimated from measured step times: ~0.9 s per training step at batch 64,
    ~4 ms per image and network call): a 1.07M-parameter UNet trained 2,000 steps (~30 min), 4,096 pairs, students
    of 400 steps each, FID on 250 images per configuration against 2,000 CIFAR-10 training images."""
    cfg = PipelineConfig(run_name="cpu")
    cfg.model = UNetConfig(base_channels=32, channel_mults=[1, 2, 2], res_blocks=1, attention_resolutions=[],
                           mid_attention=True, dropout=0.0, norm_groups=8)
    cfg.teacher = _loop(steps=2000, batch_size=64, learning_rate=1e-3, warmup_steps=100, ema_decay=0.999,
                        checkpoint_every=250, log_every=10, sample_every=500)
    cfg.sampling = SamplingConfig(sampler="euler", steps=16, guidance=1.0)
    cfg.pairs = PairsConfig(num_pairs=4096, shard_size=1024, steps=16, guidance=1.0, batch_size=64)  # bf16 autocast is fastest at 64 on 2 cores
    cfg.four_step = _loop(steps=400, batch_size=64, learning_rate=5e-4, warmup_steps=20, ema_decay=0.99,
                          checkpoint_every=200, log_every=10)
    cfg.one_step = _loop(steps=400, batch_size=64, learning_rate=5e-4, warmup_steps=20, ema_decay=0.99,
                         checkpoint_every=200, log_every=10, seed=1)
    cfg.eval = EvalConfig(teacher_steps=[1, 2, 4, 8, 16, 32], teacher_rk45=True, student_steps=[1, 2, 4],
                          num_images=250, reference="cifar10-train", reference_n=2000, batch_size=64,
                          timing_batch=64, timing_repeats=3)
    return cfg


def paper_pipeline() -> PipelineConfig:
    """GPU, published scale: DDPM's 35.75M-parameter CIFAR-10 UNet (Ho et al. 2020), batch 128, 800k steps,
    EMA 0.9999, lr 2e-4 with 5k warm-up, dropout 0.1; 1M pairs (Liu et al.'s reflow scale); FID on 50k vs 50k."""
    cfg = PipelineConfig(run_name="paper")
    cfg.model = UNetConfig(base_channels=128, channel_mults=[1, 2, 2, 2], res_blocks=2, attention_resolutions=[16],
                           mid_attention=True, dropout=0.1, norm_groups=32)
    cfg.teacher = _loop(steps=800_000, batch_size=128, learning_rate=2e-4, warmup_steps=5000, ema_decay=0.9999,
                        checkpoint_every=10_000, keep_checkpoints=3, log_every=100, sample_every=10_000)
    cfg.sampling = SamplingConfig(sampler="rk45", steps=100, guidance=1.0)
    cfg.pairs = PairsConfig(num_pairs=1_000_000, shard_size=10_000, sampler="rk45", guidance=1.0, batch_size=1000,
                            storage_dtype="float16")
    cfg.four_step = _loop(steps=100_000, batch_size=128, learning_rate=2e-5, warmup_steps=1000, ema_decay=0.9999,
                          checkpoint_every=10_000, log_every=100)
    cfg.one_step = _loop(steps=100_000, batch_size=128, learning_rate=2e-5, warmup_steps=1000, ema_decay=0.9999,
                         checkpoint_every=10_000, log_every=100, seed=1)
    cfg.options = RecipeConfig(k=4, distance="lpips")
    cfg.eval = EvalConfig(num_images=50_000, reference="cifar10-train", reference_n=None, batch_size=1000,
                          timing_batch=256, timing_repeats=5)
    return cfg


SCALES = {"smoke": smoke_pipeline, "cpu": cpu_pipeline, "paper": paper_pipeline}


def teacher_config(p: PipelineConfig, output_dir: Path | None = None) -> TeacherConfig:
    return TeacherConfig(output_dir=output_dir or Path("runs/rf_cifar/teacher"), model=p.model, flow=p.flow,
                         train=dataclasses.replace(p.teacher, device=p.device if p.device != "auto" else p.teacher.device),
                         data=p.data, sampling=p.sampling, experiment=p.experiment, track=p.track)


def pairs_config(p: PipelineConfig, teacher: Path | None = None, output_dir: Path | None = None) -> PairsConfig:
    cfg = dataclasses.replace(p.pairs, experiment=p.experiment, track=p.track)
    if p.device != "auto":
        cfg.device = p.device
    if teacher is not None:
        cfg.teacher = teacher
    if output_dir is not None:
        cfg.output_dir = output_dir
    return cfg


def distill_config(p: PipelineConfig, recipe: str, teacher: Path | None = None, pairs: Path | None = None,
                   output_dir: Path | None = None) -> DistillConfig:
    loop = p.one_step if recipe in ("one_step", "reflow") else p.four_step
    options = p.options
    if recipe == "progressive" and options.target_guidance is None:  # both students carry the pairs' CFG scale
        options = dataclasses.replace(options, target_guidance=p.pairs.guidance)
    cfg = DistillConfig(recipe=recipe, options=options, train=dataclasses.replace(loop), data=p.data,
                        experiment=p.experiment, track=p.track, output_dir=output_dir)
    if p.device != "auto":
        cfg.train.device = p.device
    if teacher is not None:
        cfg.teacher = teacher
    if pairs is not None:
        cfg.pairs = pairs
    return cfg


def evaluate_config(p: PipelineConfig) -> EvaluateConfig:
    return EvaluateConfig(eval=p.eval, data_root=p.data.data_root, device=p.device, experiment=p.experiment,
                          track=p.track)


PIPELINE_PRESETS = SCALES
TEACHER_PRESETS = {name: (lambda f=f: teacher_config(f())) for name, f in SCALES.items()}
PAIRS_PRESETS = {name: (lambda f=f: pairs_config(f())) for name, f in SCALES.items()}
DISTILL_PRESETS = {name: (lambda f=f: distill_config(f(), "k_step")) for name, f in SCALES.items()}
EVALUATE_PRESETS = {name: (lambda f=f: evaluate_config(f())) for name, f in SCALES.items()}


# ----------------------------------------------------------------------------------------------- compare (issue 12)


@dataclass
class CompareConfig:
    """``distill rf compare``: every registered distillation recipe from one teacher under one budget."""

    teacher: str = option("reference", "Teacher: a generator folder, a models:/ or runs:/ URI, or 'reference' "
                          "(the teacher shipped with distill-rf-cifar).")
    methods: list[str] = option([], "Recipes to compare (default: every registered student recipe).",
                                renamed=RENAMED_RECIPES)
    run_name: str = option("smoke", "Name of this comparison (default folder runs/rf_cifar/compare/<run-name>).")
    output_dir: Path | None = option(None, "Output folder (default: runs/rf_cifar/compare/<run-name>).")
    train: LoopConfig = nested(LoopConfig, "The budget every method gets: the same optimizer steps, batch and "
                                           "learning rate (multi-phase recipes split the steps).")
    budget: str = option("steps", "What every method gets the same of: 'steps' (--train-steps optimizer steps) or "
                         "'wall_clock' (the same training seconds, --budget-seconds, turned into a step count per "
                         "method by a timed calibration run; never fewer than --train-steps steps).",
                         choices=COMPARE_BUDGETS)
    budget_seconds: float | None = option(None, "wall_clock: training seconds per method (default: the time the "
                                          "slowest method needs for --train-steps steps).", gt=0, le=1e8)
    calibration_steps: int = option(3, "wall_clock: timed optimizer steps per phase in each method's calibration "
                                    "(after one untimed step).", ge=1, le=1000)
    options: RecipeConfig = nested(RecipeConfig, "Recipe options.")
    pairs: PairsConfig = nested(PairsConfig, "Teacher pairs (teacher/output_dir set by compare).")
    pairs_match_teacher: bool = option(True, "Make the pairs with the teacher's own default steps, sampler and "
                                             "guidance (the samples a user of the teacher gets).")
    data: DataConfig = nested(DataConfig, "CIFAR-10 (image-based recipes, real images of the discriminator).")
    eval: EvalConfig = nested(EvalConfig, "FID, latency; the teacher is evaluated at the same steps and its default.")
    lpips: bool = option(True, "LPIPS of every image to the teacher's (default steps) image at the same seed.")
    lpips_net: str = option("alex", "LPIPS backbone.", choices=("alex", "vgg"))
    device: str = option("auto", "Device of every stage.", choices=DEVICES)
    experiment: str = option("rf_cifar", "MLflow experiment.")
    track: bool = option(True, "Log to MLflow: a parent run and one child run per method.")

    def validate(self) -> None:
        self.train.validate()

    @property
    def folder(self) -> Path:
        return self.output_dir or Path("runs/rf_cifar/compare") / self.run_name


def smoke_compare() -> CompareConfig:
    """The demo's protocol for every method: 1,024 pairs, 150 optimizer steps of batch 32 per method, FID on 400
    images per configuration (methods and teacher at 1, 2, 4 steps) against 2,000 CIFAR-10 training images,
    Inception features in bf16 (stamped in the protocol)."""
    cfg = CompareConfig(run_name="smoke")
    cfg.train = _loop(steps=150, batch_size=32, learning_rate=5e-4, warmup_steps=10, ema_decay=0.99,
                      checkpoint_every=150, log_every=25)
    cfg.options = RecipeConfig(k=4, distance="l2", progressive_start=16, progressive_end=4, adv_d_learning_rate=1e-4)
    cfg.pairs = PairsConfig(num_pairs=1024, shard_size=512, batch_size=64)
    cfg.eval = EvalConfig(teacher_steps=[1, 2, 4], teacher_rk45=False, student_steps=[1, 2, 4], num_images=400,
                          reference="cifar10-train", reference_n=2000, batch_size=64, timing_batch=64,
                          timing_repeats=2, grid_classes=10, feature_precision="bf16")
    return cfg


def tiny_compare() -> CompareConfig:
    """Seconds: the test's scale (4 steps of batch 8, 24 pairs, FID on 8 images vs 16)."""
    cfg = CompareConfig(run_name="tiny")
    cfg.train = _loop(steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1, checkpoint_every=4, log_every=2,
                      log_checkpoints=False, precision="fp32")  # tiny models gain nothing from bf16 autocast
    cfg.options = RecipeConfig(progressive_start=4, progressive_end=2, guided_end=2, adv_head_channels=8, cd_grid=4,
                               dmd_fake_updates=2, dmd_head_channels=8)
    cfg.pairs = PairsConfig(num_pairs=24, shard_size=24, batch_size=24, seed_start=100)
    cfg.data = DataConfig(limit=64)
    cfg.eval = EvalConfig(teacher_steps=[1, 2], teacher_rk45=False, student_steps=[1, 2], num_images=8,
                          reference="cifar10-train", reference_n=16, batch_size=8, timing_batch=8, timing_repeats=1,
                          grid_classes=2)
    return cfg


def paper_compare() -> CompareConfig:
    """GPU: 20k optimizer steps of batch 128 per method, 100k pairs, FID on 10k images against all 50k."""
    cfg = CompareConfig(run_name="paper")
    cfg.train = _loop(steps=20_000, batch_size=128, learning_rate=2e-5, warmup_steps=500, ema_decay=0.9999,
                      checkpoint_every=5000, log_every=100)
    cfg.options = RecipeConfig(k=4, distance="lpips")
    cfg.pairs = PairsConfig(num_pairs=100_000, shard_size=10_000, batch_size=1000)
    cfg.eval = EvalConfig(teacher_steps=[1, 2, 4], teacher_rk45=True, student_steps=[1, 2, 4], num_images=10_000,
                          reference="cifar10-train", reference_n=None, batch_size=1000, timing_batch=256,
                          timing_repeats=5)
    return cfg


def real_compare() -> CompareConfig:
    """The headline table: every method gets the same training wall clock, the time the slowest method
    needs for 1,000 optimizer steps of batch 64 (so each trains >= 1,000 steps; the step counts are calibrated per
    method and reported), on 8,192 pairs; FID with 95% intervals and class accuracy on 2,000 images per configuration
    (methods and teacher at 1, 2, 4 steps) against 10,000 CIFAR-10 training images, bf16 Inception features under
    torch.compile (tens of thousands of images per run, so even a cold compile pays off)."""
    cfg = CompareConfig(run_name="real", budget="wall_clock")
    cfg.train = _loop(steps=1000, batch_size=64, learning_rate=5e-4, warmup_steps=50, ema_decay=0.999,
                      checkpoint_every=250, log_every=50)
    cfg.options = RecipeConfig(k=4, distance="l2", progressive_start=16, progressive_end=4, guided_end=4,
                               guidance_max=4.0, adv_d_learning_rate=1e-4, dmd_fake_updates=5)
    cfg.pairs = PairsConfig(num_pairs=8192, shard_size=1024, batch_size=64)
    cfg.eval = EvalConfig(teacher_steps=[1, 2, 4], teacher_rk45=False, student_steps=[1, 2, 4], num_images=2000,
                          reference="cifar10-train", reference_n=10_000, batch_size=64, timing_batch=64,
                          timing_repeats=2, grid_classes=10, feature_precision="bf16+compile", class_accuracy=True)
    return cfg


COMPARE_PRESETS = {"smoke": smoke_compare, "tiny": tiny_compare, "real": real_compare, "paper": paper_compare}
