"""Options of ``distill flash generate | turbo | train | eval``: the single source of the CLI (underscore spellings
such as ``--num_images`` and ``--compare_baseline`` are accepted as aliases automatically)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from distill_common.config import option
from distill_common.errors import ConfigError
from distill_common.models.lora import DEFAULT_TARGET_MODULES
from distill_common.runtime import DEVICES, PRECISIONS
from distill_eval.protocol import FEATURE_PRECISIONS
from distill_lora_flash.loading import DEFAULT_BASE_MODEL, DEFAULT_LORA_ID
from distill_lora_flash.prompts import DEMO_PROMPTS_NAME, resolve_prompts_file
from distill_lora_flash.schedule import DEFAULT_ORIGINAL_STEPS

DEFAULT_PROMPT = "A raccoon reading a book in a lush forest."
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_VALIDATION_PROMPTS = [
    "A raccoon reading a book in a lush forest.",
    "a photograph of an astronaut riding a horse",
    "a red vintage car parked by the sea at sunset",
    "a bowl of fruit on a wooden table, studio lighting",
]
EXPORT_FORMATS = ("diffusers", "peft", "kohya")
TRAIN_METHODS = ("noise_matching", "lcm")
FLASH_DATA_SOURCES = ("coco", "cifar10")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PROMPTS_FILE_HELP = (f"Text file with one prompt per line; '{DEMO_PROMPTS_NAME}' is the packaged list of 20 varied "
                     "prompts unless such a file exists here.")
SEED_HELP = ("Base seed: image k of each prompt uses seed + k. Default: none, i.e. a random seed is drawn and printed "
             "(and recorded in summary.json), and file names carry no _seed suffix.")


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"--{name} must be positive, got {value}")


def _steps(name: str, values: list[int]) -> None:
    if not values:
        raise ConfigError(f"--{name} needs at least one step count, e.g. --{name} 2 4 8")
    for v in values:
        if v < 1:
            raise ConfigError(f"--{name} values must be positive step counts, got {v}")


@dataclass
class GenerateConfig:
    """``distill flash generate``: Flash LoRA images at 2/4/8 LCM steps, optionally next to the 30-step baseline."""

    base_model: str = option(DEFAULT_BASE_MODEL, "Base SD 1.5 model: hub id or local diffusers folder.")
    lora_id: str = option(DEFAULT_LORA_ID, "Hub id of the Flash LoRA (used when --lora-path is not given).")
    lora_path: Path | None = option(None, "Local LoRA .safetensors file or its folder; takes precedence over --lora-id.")
    lora_scale: float = option(1.0, "Scale of the LoRA when it is fused into the UNet.", ge=0)
    prompt: str = option(DEFAULT_PROMPT, "The prompt (ignored when --prompts-file is given).")
    prompts_file: Path | None = option(None, PROMPTS_FILE_HELP)
    steps: list[int] = option([2, 4, 8], "LCM step counts to generate with, e.g. --steps 2 4 8.")
    guidance_scale: float = option(0.0, "Guidance scale of the Flash sampler (the LoRA is trained for 0).", ge=0)
    seed: int | None = option(None, SEED_HELP)
    num_images: int = option(1, "Images per prompt.", ge=1)
    batch_size: int = option(4, "Images per pipeline call.")
    outdir: Path = option(Path("outputs"), "Output folder.")
    compare_baseline: bool = option(False, "Also generate with the base model (no LoRA) and write comparisons.")
    baseline_steps: int = option(30, "Steps of the baseline sampler (the base model's own scheduler).")
    baseline_guidance: float = option(7.5, "Classifier-free guidance of the baseline.", ge=0)
    baseline_outdir: Path | None = option(None, "Baseline folder (default: OUTDIR/baseline).")
    clip_model: str = option(DEFAULT_CLIP_MODEL, "CLIP model for CLIPScore (hub id or local folder); 'none' skips it.")
    lcm_original_steps: int = option(DEFAULT_ORIGINAL_STEPS, "LCMScheduler original_inference_steps (grid size).")
    device: str = option("auto", "Device.", choices=DEVICES)
    precision: str = option("auto", "Weights precision: auto = fp16 on CUDA, fp32 elsewhere.", choices=PRECISIONS)

    def validate(self) -> None:
        _steps("steps", self.steps)
        for name in ("num_images", "batch_size", "baseline_steps", "lcm_original_steps"):
            _positive(name.replace("_", "-"), getattr(self, name))
        self.prompts_file = resolve_prompts_file(self.prompts_file)


DEFAULT_TURBO_MODEL = "stabilityai/sd-turbo"
TURBO_MODELS = ("stabilityai/sd-turbo", "stabilityai/sdxl-turbo")


def img2img_denoising_steps(steps: int, strength: float) -> int:
    """UNet steps diffusers' image-to-image pipelines run: ``min(int(steps * strength), steps)``."""
    return min(int(steps * strength), steps)


@dataclass
class TurboConfig:
    """``distill flash turbo``: SD-Turbo / SDXL-Turbo style few-step models (1-4 steps, guidance 0, the model's own
    scheduler), text-to-image or image-to-image, with the same timing table and CLIPScore columns as ``generate``."""

    model: str = option(DEFAULT_TURBO_MODEL, "Few-step model: hub id (stabilityai/sd-turbo, stabilityai/sdxl-turbo) or "
                        "local diffusers folder; loaded with diffusers' AutoPipelineForText2Image and sampled with its "
                        "own scheduler.")
    prompt: str = option(DEFAULT_PROMPT, "The prompt (ignored when --prompts-file is given).")
    prompts_file: Path | None = option(None, PROMPTS_FILE_HELP)
    steps: list[int] | None = option(None, "Step counts, e.g. --steps 1 2 4. Default: 1 (text-to-image) or 2 "
                                     "(image-to-image, at --strength 0.5).")
    guidance_scale: float = option(0.0, "Guidance scale (Turbo models are trained for 0; > 1 turns on CFG).")
    init_image: Path | None = option(None, "Image-to-image: the start image (center-cropped to a square and resized to "
                                     "the model's resolution); through AutoPipelineForImage2Image.")
    strength: float = option(0.5, "Image-to-image: how far the start image is noised (0-1]; diffusers runs "
                             "int(steps x strength) steps, which must be at least 1.")
    seed: int | None = option(None, SEED_HELP)
    num_images: int = option(1, "Images per prompt.")
    batch_size: int = option(4, "Images per pipeline call.")
    outdir: Path = option(Path("outputs"), "Output folder.")
    compare_baseline: bool = option(False, "Also generate with a many-step CFG baseline and write comparisons.")
    baseline_model: str | None = option(None, "Baseline model (e.g. the teacher, stabilityai/stable-diffusion-2-1-base); "
                                        "default: --model itself with its own scheduler.")
    baseline_steps: int = option(30, "Steps of the baseline.")
    baseline_guidance: float = option(7.5, "Classifier-free guidance of the baseline.")
    baseline_outdir: Path | None = option(None, "Baseline folder (default: OUTDIR/baseline).")
    clip_model: str = option(DEFAULT_CLIP_MODEL, "CLIP model for CLIPScore (hub id or local folder); 'none' skips it.")
    device: str = option("auto", "Device.", choices=DEVICES)
    precision: str = option("auto", "Weights precision: auto = fp16 on CUDA, fp32 elsewhere.", choices=PRECISIONS)

    @property
    def step_counts(self) -> list[int]:
        """``--steps``, or the tutorial's default: 1 step text-to-image, 2 steps image-to-image."""
        if self.steps:
            return list(self.steps)
        return [2] if self.init_image is not None else [1]

    def validate(self) -> None:
        if self.steps is not None:
            _steps("steps", self.steps)
        for name in ("num_images", "batch_size", "baseline_steps"):
            _positive(name.replace("_", "-"), getattr(self, name))
        self.prompts_file = resolve_prompts_file(self.prompts_file)
        if self.init_image is None:
            return
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"--strength must be in (0, 1], got {self.strength}")
        if Path(self.init_image).expanduser().is_dir():
            raise ConfigError(f"--init-image {self.init_image} is a folder; pass one PNG or JPEG file inside it")
        if not Path(self.init_image).expanduser().is_file():
            raise ConfigError(f"--init-image {self.init_image} does not exist; pass a local PNG or JPEG file")
        counts = self.step_counts + ([self.baseline_steps] if self.compare_baseline else [])
        for steps in counts:
            if img2img_denoising_steps(steps, self.strength) < 1:
                need = math.ceil(1 / self.strength)
                while img2img_denoising_steps(need, self.strength) < 1:  # float rounding, e.g. 3 x 0.3333...
                    need += 1
                raise ConfigError(
                    f"{steps} steps at --strength {self.strength:g} leave int({steps} x {self.strength:g}) = 0 denoising "
                    f"steps; diffusers needs steps x strength >= 1: raise --steps to {need} or --strength to "
                    f"{math.ceil(1000 / steps) / 1000:g}")


@dataclass
class TrainConfig:
    """``distill flash train``: distil the CFG teacher (base UNet) into a LoRA student for few-step sampling, by
    per-timestep noise matching (``--method noise_matching``) or latent consistency distillation (``--method lcm``,
    LCM-LoRA: Luo et al. 2023)."""

    base_model: str = option(DEFAULT_BASE_MODEL, "Teacher model: SD 1.5 or SDXL, hub id, local diffusers folder or "
                             "'reference'.")
    method: str = option("noise_matching", "Distillation recipe: noise_matching (per-timestep MSE to the CFG teacher) "
                         "or lcm (latent consistency distillation, LCM-LoRA).", choices=TRAIN_METHODS)
    output_dir: Path = option(Path("checkpoints"), "Root of the training outputs (RUN_NAME/lora/checkpoint-N inside).")
    run_name: str = option("flash-lora", "Run folder under --output-dir; rerunning it resumes from its last checkpoint.")
    resume: str = option("latest", "'latest' resumes from the newest checkpoint if any, 'never' refuses to reuse a "
                         "run folder that has checkpoints, or a checkpoint folder path.")
    # data
    dataset_name: str | None = option(None, "Hugging Face data set (e.g. lambdalabs/pokemon-blip-captions).")
    dataset_split: str = option("train", "Split of --dataset-name / subfolder of --data-dir.")
    image_column: str = option("image", "Image column of --dataset-name.")
    caption_column: str = option("text", "Caption column of --dataset-name (or metadata.jsonl key of --data-dir).")
    data_dir: Path | None = option(None, "Local captioned images: images/ + captions/, side-by-side .txt files, or "
                                   "metadata.jsonl.")
    data_root: Path | None = option(None, "Data root holding coco2017/ (default $DISTILL_DATA_ROOT); used when "
                                    "neither --dataset-name nor --data-dir is given.")
    data_shards: str | None = option(None, "Stream WebDataset caption shards instead: a brace pattern such as "
                                     "'data/{00000..00099}.tar' (image + .txt or .json caption per sample); split by "
                                     "process rank, the shard position is saved in every checkpoint.")
    data_source: str = option("coco", "Data when neither --dataset-name, --data-dir nor --data-shards is given: COCO 2017 "
                              "captions, or CIFAR-10 train images captioned with the reference model's training "
                              "templates (cifar10: 32 px, pass --resolution 32; for --base-model reference).",
                              choices=FLASH_DATA_SOURCES)
    coco_split: str = option("train", "COCO 2017 split of the default data.", choices=("train", "val"))
    max_train_samples: int | None = option(None, "Use only the first N images.", ge=1)
    resolution: int = option(512, "Training image side (pixels).")
    center_crop: bool = option(False, "Center crop (default: random crop).")
    random_flip: bool = option(True, "Random horizontal flip.")
    empty_prompt_prob: float = option(0.1, "Probability of replacing a caption by the empty prompt.", ge=0, le=1)
    dataloader_num_workers: int = option(0, "DataLoader workers (0 keeps resume exact).", ge=0)
    # model
    lora_rank: int = option(4, "LoRA rank.")
    lora_alpha: float = option(32.0, "LoRA alpha (scale alpha / rank).", gt=0)
    lora_targets: list[str] = option(list(DEFAULT_TARGET_MODULES), "UNet modules that get a LoRA.")
    teacher_guidance: float = option(7.5, "Classifier-free guidance scale of the teacher target (noise_matching) and of the "
                                    "teacher column of validation grids.", ge=0, le=100)
    snr_gamma: float = option(5.0, "Min-SNR-gamma weighting (Hang et al. 2023); 0 turns it off (noise_matching).")
    use_discrete_timesteps: bool = option(False, "Draw t only from the LCM inference timesteps of --discrete-steps "
                                         "(noise_matching).")
    discrete_steps: list[int] = option([2, 4, 8], "Step counts whose LCM timesteps form the discrete grid.")
    lcm_original_steps: int = option(DEFAULT_ORIGINAL_STEPS, "LCMScheduler original_inference_steps (grid size).")
    # --method lcm (Luo et al. 2023)
    lcm_skip: int = option(20, "LCM: skipping interval k of the teacher's DDIM solver (grid of 1000 // k timesteps).",
                           ge=1, le=500)
    lcm_guidance_min: float = option(4.0, "LCM: lowest teacher CFG scale w (eps_u + w (eps_c - eps_u)); w is drawn "
                                     "uniformly per sample from [min, max]; equal values fix it.", ge=0, le=100)
    lcm_guidance_max: float = option(16.0, "LCM: highest teacher CFG scale w.", ge=0, le=100)
    lcm_loss: str = option("huber", "LCM: consistency loss, pseudo-Huber or L2.", choices=("huber", "l2"))
    lcm_huber_c: float = option(0.001, "LCM: pseudo-Huber constant c.", gt=0, le=1)
    lcm_noise_matching_weight: float = option(0.0, "LCM: weight of an added noise-matching term (Min-SNR MSE to the CFG "
                                              "teacher at --teacher-guidance, on its own noised batch); 0 = pure "
                                              "LCM-LoRA.", ge=0, le=100)
    # optimisation
    learning_rate: float = option(1e-4, "AdamW learning rate.", gt=0)
    lr_scheduler: str = option("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "Warm-up optimiser steps.", ge=0)
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.", ge=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm.", ge=0)
    batch_size: int = option(1, "Images per micro-batch per device.", aliases=("--train-batch-size", "--train_batch_size"))
    gradient_accumulation_steps: int = option(4, "Micro-batches per optimiser step.",
                                              aliases=("--grad-accum", "--grad_accum"))
    max_steps: int = option(2000, "Optimiser steps.", aliases=("--max-train-steps", "--max_train_steps"))
    precision: str = option("auto", "Mixed precision: auto = fp16 on CUDA, fp32 on the CPU (bf16 allowed there).",
                            choices=PRECISIONS)
    gradient_checkpointing: bool = option(False, "Trade compute for UNet activation memory.")
    checkpointing_steps: int = option(500, "Save a resumable checkpoint every N optimiser steps.")
    checkpoints_total_limit: int = option(0, "Keep only the newest N checkpoints (0 keeps all).", ge=0)
    seed: int = option(0, "Seed of data order, noise and timesteps.")
    device: str = option("auto", "Device.", choices=DEVICES)
    # validation and tracking
    validation_steps: int = option(500, "Validation images every N optimiser steps (0 = only at the end).", ge=0)
    validation_prompts: list[str] = option(list(DEFAULT_VALIDATION_PROMPTS), "Validation prompts (config file only).",
                                           cli=False)
    validation_prompts_file: Path | None = option(None, "Validation prompts, one a line (overrides the built-in list).")
    validation_step_counts: list[int] = option([2, 4, 8], "Student LCM step counts shown at validation.")
    validation_teacher_steps: int = option(30, "Teacher steps (its own scheduler, CFG) shown at validation.")
    log_every: int = option(10, "Log training metrics every N optimiser steps.")
    experiment: str = option("lora_flash", "MLflow experiment.")
    track: bool = option(True, "Log the run to MLflow.")
    register_name: str | None = option("lora_flash", "Register the final LoRA generator under this MLflow model "
                                       "name ('' to skip).")

    def validate(self) -> None:
        for name in ("resolution", "lora_rank", "batch_size", "gradient_accumulation_steps", "max_steps",
                     "checkpointing_steps", "learning_rate", "lcm_original_steps", "validation_teacher_steps",
                     "log_every"):
            _positive(name.replace("_", "-"), getattr(self, name))
        if not 0.0 <= self.empty_prompt_prob <= 1.0:
            raise ConfigError(f"--empty-prompt-prob must be in [0, 1], got {self.empty_prompt_prob}")
        if self.snr_gamma < 0:
            raise ConfigError(f"--snr-gamma must be >= 0 (0 = off), got {self.snr_gamma}")
        _steps("discrete-steps", self.discrete_steps)
        _steps("validation-step-counts", self.validation_step_counts)
        if self.dataset_name and self.data_dir:
            raise ConfigError("pass either --dataset-name or --data-dir, not both")
        if self.data_shards is not None:
            if self.dataset_name or self.data_dir:
                raise ConfigError("pass either --data-shards or --dataset-name/--data-dir, not both")
            if self.dataloader_num_workers:
                raise ConfigError("--data-shards streams in the training process (its position is checkpointed); "
                                  "pass --dataloader-num-workers 0")
            if self.max_train_samples is not None:
                raise ConfigError("--max-train-samples does not apply to --data-shards; pass fewer shards instead")
            from distill_common.data.shards import expand_shards

            expand_shards(self.data_shards)
        if self.data_source not in FLASH_DATA_SOURCES:
            raise ConfigError(f"--data-source must be one of {', '.join(FLASH_DATA_SOURCES)}, got {self.data_source!r}")
        if self.data_source == "cifar10":
            if self.dataset_name or self.data_dir or self.data_shards:
                raise ConfigError("--data-source cifar10 is the default data's choice; leave out --dataset-name, "
                                  "--data-dir and --data-shards, or --data-source")
            if self.resolution != 32:
                raise ConfigError(f"--data-source cifar10 is 32 px images, got --resolution {self.resolution}; "
                                  "pass --resolution 32")
        if self.method not in TRAIN_METHODS:
            raise ConfigError(f"--method must be one of {', '.join(TRAIN_METHODS)}, got {self.method!r}")
        if self.method == "lcm" and self.use_discrete_timesteps:
            raise ConfigError("--use-discrete-timesteps is for --method noise_matching; --method lcm draws t on its "
                              "own skipping-step grid (--lcm-skip)")
        if self.lcm_noise_matching_weight and self.method != "lcm":
            raise ConfigError(f"--lcm-noise-matching-weight adds a term to --method lcm; --method {self.method} already "
                              "is noise matching: pass --method lcm or leave the weight at 0")
        if self.lcm_guidance_min > self.lcm_guidance_max:
            raise ConfigError(f"--lcm-guidance-min {self.lcm_guidance_min:g} is above --lcm-guidance-max "
                              f"{self.lcm_guidance_max:g}; pass min <= max (equal values fix w)")


BASELINE_LABEL = "baseline"
STUDENT_LABEL = "flash"
CONTROL_LABEL = "base"


def default_lora_label(path: str) -> str:
    """A label from a LoRA path: the run folder of ``RUN/lora/final`` or ``RUN/lora/checkpoint-N`` (``RUN`` and
    ``RUN-checkpoint-N``), else the file's folder for a ``.safetensors`` file, else the folder's name."""
    parts = [p for p in Path(path).expanduser().parts if p not in (".", Path(path).anchor)]
    if parts and parts[-1].endswith(".safetensors"):
        parts = parts[:-1] if len(parts) > 1 else [Path(parts[-1]).stem]
    if len(parts) >= 3 and parts[-2] == "lora" and (parts[-1] == "final" or parts[-1].startswith("checkpoint-")):
        name = parts[-3] if parts[-1] == "final" else f"{parts[-3]}-{parts[-1]}"
    else:
        name = parts[-1] if parts else STUDENT_LABEL
    return re.sub(r"[^\w.-]+", "-", name).lstrip(".") or STUDENT_LABEL  # a plain folder name


def lora_path_list(value: str | Path | list[str | Path] | None) -> list[str]:
    """``EvalConfig.lora_path`` as a list of strings (the Python API may pass one path, or None)."""
    if value is None:
        return []
    return [str(value)] if isinstance(value, (str, Path)) else [str(v) for v in value]


def lora_specs(values: list[str]) -> list[tuple[str, str]]:
    """(label, path) of each ``--lora-path [LABEL=]PATH``; a single unlabelled path is labelled 'flash'. Raises
    ConfigError (one line) for an empty path, a label that cannot name a folder, a reserved or a repeated label."""
    specs = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or any(c in label for c in "/\\"):  # a path holding '=' (runs/lr=1e-4/lora/final)
            label, path = "", value
        if not path.strip():
            raise ConfigError(f"--lora-path {value!r} names no path; pass [LABEL=]PATH, e.g. seed=RUN/lora/final")
        specs.append((label.strip(), path.strip()))
    if len(specs) == 1 and not specs[0][0]:
        return [(STUDENT_LABEL, specs[0][1])]
    specs = [(label or default_lora_label(path), path) for label, path in specs]
    seen: dict[str, str] = {}
    for label, path in specs:
        if not label or label in (".", "..") or label.startswith(".") or any(c in label for c in "/\\\0,= "):
            raise ConfigError(f"LoRA label {label!r} (for {path}) is not a plain name; pass LABEL=PATH with a label "
                              "of letters, digits, '-' or '_'")
        if label in (BASELINE_LABEL, CONTROL_LABEL):
            raise ConfigError(f"LoRA label {label!r} (for {path}) is reserved ('{BASELINE_LABEL}': the CFG baseline, "
                              f"'{CONTROL_LABEL}': the no-LoRA control); pass another LABEL=PATH")
        if label in seen:
            raise ConfigError(f"LoRA label {label!r} is given twice ({seen[label]} and {path}); give each "
                              "--lora-path its own LABEL=PATH")
        seen[label] = path
    return specs


@dataclass
class EvalConfig:
    """``distill flash eval``: baseline (30 steps, CFG 7.5) vs LoRA students (and optionally the no-LoRA control) at
    2/4/8 steps, at fixed seeds."""

    base_model: str = option(DEFAULT_BASE_MODEL, "Base SD 1.5 model: hub id or local diffusers folder.")
    lora_id: str = option(DEFAULT_LORA_ID, "Hub id of the LoRA (used when --lora-path is not given).")
    lora_path: list[str] = option([], "LoRA file/folder(s) to compare, each [LABEL=]PATH, e.g. seed=RUN_A/lora/final; "
                                  "repeat the flag or give a comma list; takes precedence over --lora-id. Default "
                                  "label: the run folder of RUN/lora/final ('flash' for a single unlabelled path).")
    lora_scale: float = option(1.0, "Scale of the fused LoRA(s).")
    control: bool = option(False, f"Also sample the base model without a LoRA with the student schedule and guidance "
                           f"at --steps, labelled '{CONTROL_LABEL}': does the LoRA make a few-step student at all?")
    prompt: str | None = option(None, "One prompt for every image (instead of --prompts-file / --coco-prompts).")
    prompts_file: Path | None = option(None, "Prompts, one a line (default: --coco-prompts seeded COCO val captions); "
                                       f"'{DEMO_PROMPTS_NAME}' is the packaged list of 20 unless such a file exists here.")
    coco_prompts: int = option(16, "Number of seeded COCO val2017 captions used as prompts without --prompts-file.", ge=0)
    num_images: int = option(1, "Images per prompt (seeds seed..seed+N-1 over all images).")
    steps: list[int] = option([2, 4, 8], "Student LCM step counts.")
    guidance_scale: float = option(0.0, "Student guidance scale.")
    baseline_steps: int = option(30, "Baseline steps (the base model's own scheduler).")
    baseline_guidance: float = option(7.5, "Baseline classifier-free guidance.")
    seed: int = option(0, "First seed.")
    batch_size: int = option(4, "Generation and timing batch size.")
    timing_repeats: int = option(3, "Timed batches per configuration after one warm-up batch.")
    clip_model: str = option(DEFAULT_CLIP_MODEL, "CLIP model for CLIPScore; 'none' skips it.")
    lpips_net: str = option("alex", "LPIPS backbone.", choices=("alex", "vgg"))
    fid: bool = option(False, "Also compute FID/KID against --fid-reference, and each FID's ratio to the "
                       "baseline's.")
    fid_reference: str = option("coco-val2017", "FID reference set (see distill eval benchmark).")
    feature_precision: str = option("fp32", "Inception forward precision of FID/KID: fp32, or bf16 (about 2x faster on "
                                    "CPUs with bf16 units; never ranked against fp32 numbers); +compile runs it "
                                    "under torch.compile (1.34x, worth it from a few hundred images).",
                                    choices=FEATURE_PRECISIONS)
    reference_n: int | None = option(None, "Reference images for FID (default: all available).", ge=2)
    grid_rows: int = option(8, "Prompts shown in the comparison grid.")
    output_dir: Path = option(Path("runs/lora_flash/eval"), "Where images, grids and reports go.")
    data_root: Path | None = option(None, "Data root holding coco2017/ (default $DISTILL_DATA_ROOT).")
    lcm_original_steps: int = option(DEFAULT_ORIGINAL_STEPS, "LCMScheduler original_inference_steps.")
    experiment: str = option("lora_flash_eval", "MLflow experiment.")
    track: bool = option(True, "Log the evaluation to MLflow.")
    device: str = option("auto", "Device.", choices=DEVICES)
    precision: str = option("auto", "Weights precision: auto = fp16 on CUDA, fp32 elsewhere.", choices=PRECISIONS)

    def validate(self) -> None:
        _steps("steps", self.steps)
        for name in ("num_images", "batch_size", "baseline_steps", "timing_repeats", "grid_rows"):
            _positive(name.replace("_", "-"), getattr(self, name))
        if self.prompt is not None and self.prompts_file is not None:
            raise ConfigError("pass either --prompt or --prompts-file, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("--prompt is empty; pass the prompt text, e.g. --prompt \"a cat\"")
        if self.prompt is not None and len(self.prompt.strip().splitlines()) > 1:
            raise ConfigError("--prompt holds a line break (it would become several prompts); pass one line, or "
                              "several prompts one a line with --prompts-file")
        self.lora_path = lora_path_list(self.lora_path)
        lora_specs(self.lora_path)  # labels checked before any model is loaded
        self.prompts_file = resolve_prompts_file(self.prompts_file)
        if self.prompt is None and self.prompts_file is None and self.coco_prompts < 1:
            raise ConfigError("no prompts; pass --prompt TEXT, --prompts-file FILE or --coco-prompts N (N >= 1)")


@dataclass
class ExportConfig:
    """``distill flash export``: a trained LoRA in the diffusers, peft or kohya (ComfyUI / A1111) format."""

    lora_path: Path = option(Path("checkpoints/flash-lora/lora/final"), "The LoRA to export: a diffusers-format "
                             ".safetensors file or its folder (e.g. RUN/lora/final or RUN/lora/checkpoint-N).")
    format: str = option("diffusers", "diffusers (pytorch_lora_weights.safetensors, peft config in metadata), peft "
                         "(adapter_model.safetensors + adapter_config.json) or kohya (lora_unet_* keys with .alpha "
                         "tensors, for ComfyUI / AUTOMATIC1111).", choices=EXPORT_FORMATS)
    output: Path | None = option(None, "Output .safetensors file (diffusers, kohya) or folder (peft). Default: "
                                 "export/ next to the input (export/lora_kohya.safetensors, export/peft/, ...).")

    def validate(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if self.output is not None and self.format != "peft" and Path(self.output).suffix != ".safetensors":
            raise ConfigError(f"--output {self.output} must end in .safetensors for --format {self.format}")


def demo_eval_preset() -> EvalConfig:
    """The seed project's evaluation protocol: the 20 packaged demo prompts x 10 images (seeds 0..199), the LoRA at
    2/4/8 LCM steps against the base model at 30 steps with CFG 7.5."""
    return EvalConfig(prompts_file=Path(DEMO_PROMPTS_NAME), num_images=10, steps=[2, 4, 8], baseline_steps=30,
                      baseline_guidance=7.5)


EVAL_PRESETS = {"demo": demo_eval_preset}
