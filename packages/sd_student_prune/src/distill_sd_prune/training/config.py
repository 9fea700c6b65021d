"""Options of ``distill prune train``. Fields whose default is None take the recipe's value (see
``recipes.py``); any of them can be set from the command line, a ``--config`` file, or Python, and the fully
resolved config (no None left) is what MLflow records."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from distill_common.config import nested, option
from distill_common.errors import ConfigError
from distill_common.models.sd_loading import SD15_MODEL_ID
from distill_common.runtime import DEVICES, PRECISIONS
from distill_eval.protocol import FEATURE_PRECISIONS
from distill_sd_prune.architecture.channel_init import INIT_METHODS
from distill_sd_prune.architecture.pruning import PRUNE_PLANS
from distill_sd_prune.data.training_data import CIFAR_RESOLUTION, TRAIN_SOURCES
from distill_sd_prune.sampling.pipeline import SAMPLERS
from distill_sd_prune.schedules.learning_rate import LR_SCHEDULES
from distill_sd_prune.schedules.timesteps import TIMESTEP_SAMPLERS

RECIPES = ("v1", "v2.1", "v2.2", "v3")
KD_ALPHA_SCHEDULES = ("constant", "linear")
DEFAULT_TEACHER = SD15_MODEL_ID


@dataclass
class StudentOptions:
    plan: str | None = option(None, "Block pruning plan (default: the recipe's).", choices=tuple(PRUNE_PLANS))
    width: float | None = option(
        None, "Channel width relative to the teacher, in (0, 1] (default: the recipe's).", gt=0, le=1
    )
    init: str | None = option(
        None, "How the student inherits the teacher's weights (default: the recipe's).", choices=INIT_METHODS
    )
    unet: Path | None = option(
        None, "A student folder from 'distill prune prepare-unet' (replaces plan/width/init)."
    )


@dataclass
class LossOptions:
    task_weight: float | None = option(None, "Weight of the task noise MSE (default: the recipe's).", ge=0)
    output_kd_weight: float | None = option(None, "Weight of output KD, MSE to the teacher's prediction.", ge=0)
    feature_kd_weight: float | None = option(None, "Weight of feature KD, summed MSE over hooked blocks.", ge=0)
    feature_blocks: list[str] = option(
        [], "Student blocks for feature KD (empty: every down, mid and up block)."
    )
    kd_alpha: str | None = option(
        None,
        "KD weight schedule: constant weights, or linear alpha(t): task x (1-alpha), KD x alpha.",
        choices=KD_ALPHA_SCHEDULES,
    )
    kd_alpha_start: float = option(1.0, "alpha at the first step (linear schedule).", ge=0, le=1)
    kd_alpha_end: float = option(0.5, "alpha at the last step (linear schedule).", ge=0, le=1)
    balance: bool | None = option(None, "Rescale KD terms to the task loss's running magnitude.")
    balance_beta: float = option(0.99, "EMA decay of the magnitude balancer.", ge=0, lt=1)


@dataclass
class ScheduleOptions:
    timesteps: str | None = option(
        None,
        "Training timesteps: uniform over 0..T-1, or the progressive DDPM chain.",
        choices=TIMESTEP_SAMPLERS,
    )
    chain_start: int = option(1000, "Progressive chain: steps in the first stage.", ge=1)
    chain_end: int = option(25, "Progressive chain: steps in the last stage (the inference chain).", ge=1)
    chain_stages: int = option(4, "Progressive chain: number of equal-length stages.", ge=1)
    caption_dropout_start: float | None = option(None, "Caption dropout rate at the first step.", ge=0, le=1)
    caption_dropout_end: float | None = option(None, "Caption dropout rate at the last step.", ge=0, le=1)
    lr: str | None = option(None, "Learning-rate schedule.", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "Linear warm-up steps of the constant schedule.", ge=0)
    onecycle_pct_start: float = option(0.3, "Fraction of the run OneCycleLR spends rising.", gt=0, lt=1)
    ema: bool | None = option(
        None, "Keep an EMA of the student's weights (exported instead of the live ones)."
    )
    ema_decay: float = option(0.9999, "EMA decay (with warm-up: min(decay, 1 - (1 + step)^(-2/3))).", ge=0, lt=1)


@dataclass
class DataOptions:
    source: str = option(
        "coco",
        "Training images and captions: COCO 2017 captions, or CIFAR-10 train images captioned with the reference "
        "model's training templates (32 px; for the reference teacher).",
        choices=TRAIN_SOURCES,
    )
    root: Path | None = option(None, "Data root holding coco2017/ or cifar10/ (default: $DISTILL_DATA_ROOT).")
    split: str = option("train", "COCO 2017 split to train on (cifar10: train only).", choices=("train", "val"))
    limit: int | None = option(None, "Use only the first N images.", ge=1)
    resolution: int | None = option(
        None, "Image resolution, 64..512 for coco, 32 for cifar10 (default: the recipe's; cifar10: 32)."
    )
    center_crop: bool = option(True, "Center (else random) square crop.")
    random_flip: bool = option(False, "Random horizontal flips.")
    cache: bool = option(False, "Cache VAE latents and text embeddings on disk (safetensors).")
    cache_dir: Path | None = option(None, "Cache root (default: OUTPUT_DIR/../latent_cache).")
    cache_dtype: str = option("fp16", "Storage dtype of the cache.", choices=("fp16", "bf16", "fp32"))
    num_workers: int = option(0, "DataLoader worker processes.", ge=0)
    shards: str | None = option(None, "Stream WebDataset caption shards instead of COCO, e.g. "
                                "'data/{00000..00099}.tar' (image + .txt or .json caption); split by process rank, "
                                "the shard position is saved in every checkpoint.")


@dataclass
class EvalOptions:
    every: int | None = option(
        None,
        "Periodic FID + LPIPS every N steps (0: off): a fixed COCO val subset (coco), or the comparison's "
        "scoring protocol at N = --eval-num-images (cifar10).",
        ge=0,
    )
    num_images: int = option(
        16, "Images per periodic evaluation (coco: the val subset, which is also the FID reference).", ge=1
    )
    reference_n: int = option(
        10_000, "cifar10: CIFAR-10 train images of the FID reference (the scoring protocol's).", ge=2
    )
    classifier: str = option(
        "none", "cifar10: CIFAR-10 classifier for class accuracy: none, 'reference' (shipped) or a folder."
    )
    steps: int = option(25, "Sampler steps for periodic evaluation.", ge=1)
    guidance: float = option(5.0, "CFG scale for periodic evaluation.", ge=0)
    scheduler: str = option("ddpm", "Sampler for periodic evaluation.", choices=tuple(SAMPLERS))
    lpips_net: str = option("alex", "LPIPS backbone.", choices=("alex", "vgg"))
    batch_size: int = option(8, "Generation batch size.", ge=1)
    feature_precision: str = option("fp32", "cifar10: Inception forward precision of the periodic FID (the scoring "
                                    "protocol's).", choices=FEATURE_PRECISIONS)


@dataclass
class TrainConfig:
    """``distill prune train``: distil a pruned / narrowed Stable Diffusion student on COCO captions."""

    recipe: str = option("v2.2", "Named composition of components: v1, v2.1, v2.2 or v3.", choices=RECIPES)
    teacher_model: str = option(
        DEFAULT_TEACHER, "Teacher: hub id, local diffusers folder or single-file checkpoint."
    )
    output_dir: Path = option(Path("runs/prune/train"), "Checkpoints, the final student and logs go here.")
    student: StudentOptions = nested(StudentOptions)
    loss: LossOptions = nested(LossOptions)
    schedule: ScheduleOptions = nested(ScheduleOptions)
    data: DataOptions = nested(DataOptions)
    eval: EvalOptions = nested(EvalOptions)
    max_steps: int = option(1000, "Optimiser steps.", ge=1)
    batch_size: int = option(8, "Micro-batch size per process.", ge=1)
    gradient_accumulation: int | None = option(
        None, "Micro-batches per optimiser step (default: the recipe's).", ge=1
    )
    learning_rate: float | None = option(None, "Peak learning rate of AdamW (default: the recipe's).", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay.", ge=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", ge=0)
    precision: str | None = option(
        None, "fp32, or fp16/bf16 mixed precision via Accelerate (default: recipe's).", choices=PRECISIONS
    )
    device: str = option("auto", "Device.", choices=DEVICES)
    seed: int = option(0, "Seed of the data order, noise, timesteps and caption dropout.")
    checkpoint_every: int = option(500, "Atomic checkpoint every N steps (and at the end).", ge=1)
    keep_checkpoints: int = option(2, "Checkpoints kept (0: all).", ge=0)
    resume: bool = option(True, "Resume from the latest checkpoint in OUTPUT_DIR/checkpoints.")
    log_every: int = option(10, "Log metrics every N steps.", ge=1)
    experiment: str = option("sd_student_prune", "MLflow experiment.")
    run_name: str | None = option(None, "MLflow run name (default: RECIPE-BUDGET).")
    track: bool = option(True, "Log to MLflow.")
    register: bool = option(False, "Register the final student in the MLflow model registry.")
    registered_name: str = option("sd_student_prune", "Registered model name.")
    bundle_base: bool = option(
        False, "Copy the teacher's VAE/text encoder/tokenizer into the exported student."
    )

    def validate(self) -> None:
        """Fill the recipe's values into unset fields, then check ranges (resolve_config calls this)."""
        from distill_sd_prune.training.recipes import apply_recipe

        cifar = self.data.source == "cifar10"
        if cifar and self.data.resolution is None:
            self.data.resolution = CIFAR_RESOLUTION  # before the recipe's 64 / 512 px
        apply_recipe(self)
        if self.max_steps < 1 or self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ConfigError("--max-steps, --batch-size and --gradient-accumulation must be at least 1")
        if cifar and (self.data.resolution != CIFAR_RESOLUTION or self.data.split != "train"):
            raise ConfigError(
                f"--data-source cifar10 trains on the 32 px train split; got --data-resolution "
                f"{self.data.resolution} and --data-split {self.data.split}: drop both options"
            )
        if not cifar and not 64 <= self.data.resolution <= 512:
            raise ConfigError(
                f"student resolution {self.data.resolution} is outside 64..512; pass --data-resolution 64"
            )
        if self.eval.every and self.eval.num_images < 2:
            raise ConfigError(
                "periodic FID needs at least 2 images; pass --eval-num-images 2 or more, or --eval-every 0"
            )
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("--checkpoint-every and --log-every must be at least 1")
        if self.data.shards is not None:
            from distill_common.data.shards import expand_shards

            for flag, on in (("--data-cache", self.data.cache), ("--data-limit", self.data.limit is not None),
                             ("--data-num-workers", bool(self.data.num_workers))):
                if on:
                    raise ConfigError(f"{flag} does not apply to --data-shards (streamed in the training process); "
                                      f"drop {flag}")
            expand_shards(self.data.shards)

    def resolved(self) -> TrainConfig:
        """A copy with every recipe field filled in and validated."""
        cfg = dataclasses.replace(
            self,
            student=dataclasses.replace(self.student),
            loss=dataclasses.replace(self.loss),
            schedule=dataclasses.replace(self.schedule),
            data=dataclasses.replace(self.data),
            eval=dataclasses.replace(self.eval),
        )
        cfg.validate()
        return cfg
