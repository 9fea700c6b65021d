"""The LoRA student training loop, one loop for every recipe: ``--method noise_matching`` (noise matching to a CFG
teacher, optional Min-SNR weighting and discrete LCM timesteps, :mod:`distill_lora_flash.losses`) and
``--method lcm`` (latent consistency distillation, LCM-LoRA, :mod:`distill_lora_flash.lcm`), on SD 1.5 or SDXL
(:mod:`distill_lora_flash.conditioning`), with atomic checkpoints, exact resume and validation images.

A recipe is a small component ``method(unet, latents, cond, uncond) -> (loss, logs)``; the loop around it (data,
VAE encoding, text conditioning, accumulation, checkpoints, validation) is shared.

Layout of a run: ``{output_dir}/{run_name}/``
    ``train_config.yaml``                        the resolved options
    ``lora/checkpoint-{N}/``                      ``pytorch_lora_weights.safetensors`` + ``training_state.pt``
    ``lora/final/pytorch_lora_weights.safetensors``
    ``generator/``                               ``generator.json`` + the final LoRA (the registered model)

Every LoRA file is in diffusers' format, so ``pipe.load_lora_weights(folder)`` reads it. The loop itself never
logs: it reports numbers and images through :class:`TrainHooks`, which the CLI connects to MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from distill_common.checkpoint import (
    atomic_dir,
    checkpoint_dir,
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    rng_state,
    save_training_state,
    set_rng_state,
)
from distill_common.config import save_config, to_dict
from distill_common.errors import ConfigError, ModelLoadError
from distill_common.models.lora import LORA_WEIGHT_NAME, add_lora, lora_parameters, save_lora
from distill_lora_flash.conditioning import (
    SDTextEncoder,
    SDXLTextEncoder,
    check_pipeline_class,
    expand_conditioning,
)
from distill_lora_flash.config import TrainConfig
from distill_lora_flash.generator import FlashGenerator, write_generator_folder
from distill_lora_flash.lcm import LCMMethod, WeightedMethods
from distill_lora_flash.losses import NoiseMatchingLoss, NoiseMatchingMethod
from distill_lora_flash.schedule import FlashSchedule

CONFIG_FILE = "train_config.yaml"
# Options that must not change between a run and its resumption.
RESUME_INVARIANTS = ("base_model", "method", "lcm_skip", "lcm_noise_matching_weight", "data_source", "data_shards",
                     "lora_rank", "lora_alpha", "lora_targets", "resolution", "batch_size",
                     "gradient_accumulation_steps", "seed", "use_discrete_timesteps", "discrete_steps")


@dataclass
class TrainHooks:
    """Where the loop reports: ``metrics(step, {name: value})`` and ``images(step, {name: PIL image})``."""

    metrics: Callable[[int, dict[str, float]], None] | None = None
    images: Callable[[int, dict[str, Any]], None] | None = None


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    generator_dir: Path
    global_step: int
    resumed_from: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def lora_dir(cfg: TrainConfig) -> Path:
    return run_dir(cfg) / "lora"


# ------------------------------------------------------------------------------------------- state


def load_lora_into_unet(unet: Any, lora_file: str | Path, adapter_name: str = "default") -> None:
    """Copy a diffusers-format LoRA file into the UNet's existing peft adapter (resume)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(Path(lora_file).parent),
                                                       weight_name=Path(lora_file).name)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected or not unet_state:
        raise ModelLoadError(f"{lora_file} does not fit this UNet's LoRA ({len(unexpected)} unexpected keys); "
                             "resume with the --lora-rank/--lora-targets it was trained with")


def _check_resume_config(cfg: TrainConfig, folder: Path) -> None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    now = to_dict(cfg)
    changed = [k for k in RESUME_INVARIANTS if k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"run {folder} was started with other options ({detail}); use the same options to resume "
                          "or pass a new --run-name")


def _resume_checkpoint(cfg: TrainConfig) -> Path | None:
    root = lora_dir(cfg)
    if cfg.resume == "latest":
        return latest_checkpoint(root)
    if cfg.resume == "never":
        if latest_checkpoint(root) is not None:
            raise ConfigError(f"{root} already holds checkpoints; pass --resume latest to continue it or a new --run-name")
        return None
    path = Path(cfg.resume).expanduser()
    if not (path / LORA_WEIGHT_NAME).is_file():
        raise ConfigError(f"--resume {cfg.resume!r} is not a checkpoint folder; pass 'latest', 'never' or a "
                          "lora/checkpoint-N folder")
    return path


# ------------------------------------------------------------------------------------------- helpers


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """CLIP text embeddings (B, 77, D) as SD 1.5 conditions on them (last hidden state, padded to 77)."""
    return SDTextEncoder(tokenizer, text_encoder, device)(prompts)


@dataclass
class TrainingModel:
    """What the loop needs of the teacher: UNet (gets the LoRA), VAE, scheduler, the caption encoder and a pipeline
    on the same UNet for validation images. ``kind`` is the diffusers pipeline class."""

    kind: str
    unet: Any
    vae: Any
    scheduler: Any
    encode: Callable[[Sequence[str]], Any]
    pipeline: Any
    unconditional: Callable[[], Any]


def load_training_model(model: str, dtype: torch.dtype, device: torch.device, resolution: int) -> TrainingModel:
    """SD 1.5 through ``load_sd_components``; SDXL through ``StableDiffusionXLPipeline`` (two text encoders, pooled
    embeddings, time ids); any other pipeline class is refused with one line naming the supported ones."""
    from distill_common.models.sd_loading import load_sd_components, load_sd_pipeline, pipeline_class_name

    kind = check_pipeline_class(pipeline_class_name(model), model)
    if kind == "StableDiffusionXLPipeline":
        from diffusers import StableDiffusionXLPipeline

        pipe = load_sd_pipeline(model, dtype=dtype, device=device, pipeline_cls=StableDiffusionXLPipeline)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False)
        if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (as diffusers' SDXL scripts, keep it fp32)
        encoder = SDXLTextEncoder(pipe, resolution, device)
        return TrainingModel(kind, pipe.unet, pipe.vae, pipe.scheduler, encoder, pipe, encoder.unconditional)
    from diffusers import StableDiffusionPipeline

    parts = load_sd_components(model, dtype=dtype, device=device)
    for module in (parts.vae, parts.text_encoder):
        module.requires_grad_(False)
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    encoder = SDTextEncoder(parts.tokenizer, parts.text_encoder, device)
    return TrainingModel(kind, parts.unet, parts.vae, parts.scheduler, encoder, pipe, lambda: encoder([""]))


def encode_latents(vae: Any, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """VAE posterior sample times the scaling factor, in ``dtype``; a VAE kept in fp32 (SDXL's under fp16) runs
    outside autocast, so mixed precision cannot push it back to fp16."""
    import contextlib

    vae_dtype = next(vae.parameters()).dtype
    upcast = vae_dtype == torch.float32 and dtype != torch.float32
    guard = torch.autocast(pixels.device.type, enabled=False) if upcast else contextlib.nullcontext()
    with guard:
        latents = vae.encode(pixels.to(vae_dtype)).latent_dist.sample() * vae.config.scaling_factor
    return latents.to(dtype)


def build_method(cfg: TrainConfig, schedule: FlashSchedule, noise_scheduler: Any, device: torch.device,
                 discrete: list[int] | None) -> Any:
    """The recipe component ``method(unet, latents, cond, uncond) -> (loss, logs)`` that ``cfg.method`` names."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    loss_fn = NoiseMatchingLoss(alphas_cumprod, cfg.teacher_guidance, cfg.snr_gamma or None, schedule.prediction_type)
    noise_matching = NoiseMatchingMethod(loss_fn, noise_scheduler, schedule.timestep_sampler(discrete))
    if cfg.method != "lcm":
        return noise_matching
    lcm = LCMMethod(alphas_cumprod, skip=cfg.lcm_skip, guidance_min=cfg.lcm_guidance_min,
                    guidance_max=cfg.lcm_guidance_max, loss=cfg.lcm_loss, huber_c=cfg.lcm_huber_c,
                    prediction_type=schedule.prediction_type)
    if not cfg.lcm_noise_matching_weight:
        return lcm
    return WeightedMethods([(1.0, lcm), (cfg.lcm_noise_matching_weight, noise_matching)])


def _prompts(cfg: TrainConfig) -> list[str]:
    if cfg.validation_prompts_file is not None:
        from distill_common.data.prompts import load_prompts_file

        return load_prompts_file(cfg.validation_prompts_file)
    return list(cfg.validation_prompts)


class Validator:
    """Teacher (own scheduler, CFG) and student (LCM, guidance 0) images of fixed prompts and seeds, side by side.

    The teacher is frozen, so its column is generated once. RNG streams of training are left untouched.
    """

    def __init__(self, pipe: Any, unet: Any, schedule: FlashSchedule, cfg: TrainConfig, prompts: list[str],
                 autocast: Callable[[], Any]) -> None:
        self.unet = unet
        self.pipe = pipe  # its UNet is ``unet`` (the LoRA student; the teacher with adapters off)
        self.pipe.set_progress_bar_config(disable=True)
        self.student = FlashGenerator(self.pipe, schedule, default_steps=min(cfg.validation_step_counts))
        self.teacher = FlashGenerator(self.pipe, None, default_steps=cfg.validation_teacher_steps,
                                      default_guidance=cfg.teacher_guidance, label="teacher")
        self.cfg = cfg
        self.prompts = prompts
        self.seeds = [cfg.seed + i for i in range(len(prompts))]
        self.autocast = autocast
        self.teacher_images: torch.Tensor | None = None

    def __call__(self, step: int) -> dict[str, Any]:
        from distill_eval.grids import comparison_grid

        was_training = self.unet.training
        self.unet.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices), self.autocast():
                if self.teacher_images is None:
                    self.unet.disable_adapters()
                    try:
                        self.teacher_images = self.teacher.generate(self.prompts, self.cfg.validation_teacher_steps,
                                                                    self.seeds)
                    finally:
                        self.unet.enable_adapters()
                students = {n: self.student.generate(self.prompts, n, self.seeds)
                            for n in self.cfg.validation_step_counts}
        finally:
            self.unet.train(was_training)
        columns = [(f"teacher {self.cfg.validation_teacher_steps} steps CFG {self.cfg.teacher_guidance:g}",
                    self.teacher_images)]
        columns += [(f"student {n} steps", imgs) for n, imgs in students.items()]
        grid = comparison_grid(columns, self.prompts, title=f"training step {step}")
        out: dict[str, Any] = {"grid": grid}
        out.update({f"student_s{n}": imgs for n, imgs in students.items()})
        out["teacher"] = self.teacher_images
        return out


# ------------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig, hooks: TrainHooks | None = None, console: Any = None) -> TrainResult:
    """Distil the base model's CFG predictions into a LoRA; resumes from the run's latest checkpoint."""
    from rich.console import Console

    from distill_common.runtime import make_accelerator, resolve_device, resolve_precision

    hooks = hooks or TrainHooks()
    console = console or Console()
    folder = run_dir(cfg)
    resume_from = _resume_checkpoint(cfg)
    if resume_from is not None:
        _check_resume_config(cfg, folder)

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    _release_accelerate_state()  # a finished run earlier in this process may have fixed another precision
    accelerator = make_accelerator(precision, cfg.gradient_accumulation_steps, device=cfg.device)
    try:
        return _train(cfg, hooks, console, accelerator, precision, resume_from, folder)
    finally:
        _release_accelerate_state()


def _release_accelerate_state() -> None:
    """Accelerate's state is a process-wide singleton: release it so a later run may choose another precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _train(cfg: TrainConfig, hooks: TrainHooks, console: Any, accelerator: Any, precision: str,
           resume_from: Path | None, folder: Path) -> TrainResult:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from distill_common.data.shards import iter_batches
    from distill_common.runtime import seed_everything
    from distill_lora_flash.data import (
        EpochShuffleSampler,
        collate_captioned,
        training_dataset,
        training_stream,
    )

    final_dir = lora_dir(cfg) / "final"
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    seed_everything(cfg.seed)

    # models: frozen VAE / text encoder / UNet in the weight dtype, trainable LoRA in fp32
    parts = load_training_model(cfg.base_model, weight_dtype, accelerator.device, cfg.resolution)
    unet = parts.unet
    add_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets)
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = lora_parameters(unet)

    # schedules: the LCM object the generator samples with also gives the discrete training grid
    schedule = FlashSchedule.from_scheduler(parts.scheduler, cfg.lcm_original_steps)
    noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
    schedule.verify_noise_schedule(noise_scheduler)
    discrete = list(cfg.discrete_steps) if cfg.use_discrete_timesteps and cfg.method == "noise_matching" else None
    method = build_method(cfg, schedule, noise_scheduler, accelerator.device, discrete)

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_steps * accelerator.num_processes)
    stream, loader = None, None
    if cfg.data_shards:  # streamed, split by rank here (so not handed to accelerate's loader sharding)
        stream = training_stream(cfg, accelerator.process_index, accelerator.num_processes)
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    else:
        dataset = training_dataset(cfg)
        sampler = EpochShuffleSampler(len(dataset), cfg.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=False,
                                             collate_fn=collate_captioned, num_workers=cfg.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    base_unet = accelerator.unwrap_model(unet)

    global_step, epoch, batch_in_epoch = 0, 0, 0
    if resume_from is not None:
        load_lora_into_unet(base_unet, resume_from / LORA_WEIGHT_NAME)
        state = load_training_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        global_step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        set_rng_state(state["rng"])
        if stream is not None:
            positions = state.get("data") or []
            if len(positions) != accelerator.num_processes:
                fix = (f"resume with `accelerate launch --num_processes {len(positions)}`" if positions
                       else "resume with the data it was written with")
                raise ConfigError(f"{resume_from} holds shard positions for {len(positions)} process(es), this run "
                                  f"has {accelerator.num_processes}; {fix} or pass a new --run-name")
            stream.load_state_dict(positions[accelerator.process_index])
        console.print(f"resuming {folder} from {resume_from.name} (step {global_step})", highlight=False)
    if accelerator.is_main_process:
        save_config(cfg, folder / CONFIG_FILE)

    with torch.no_grad():
        uncond_embed = parts.unconditional()  # (1, 77, D), or SDXL's Conditioning
    validator = None
    if accelerator.is_main_process:
        validator = Validator(parts.pipeline, base_unet, schedule, cfg, _prompts(cfg), accelerator.autocast)
        validator.student.schedule.verify(validator.student.scheduler, discrete or cfg.validation_step_counts)

    def data_positions() -> list[dict[str, Any]] | None:
        """Every process's shard position (a collective call: all ranks run it)."""
        if stream is None:
            return None
        from accelerate.utils import gather_object

        return list(gather_object([stream.state_dict()]))

    def save_checkpoint(step: int, positions: list[dict[str, Any]] | None) -> Path:
        target = checkpoint_dir(lora_dir(cfg), step)
        with atomic_dir(target) as tmp:
            save_lora(base_unet, tmp)
            save_training_state(tmp, {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                      "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                                      "rng": rng_state(), "data": positions})
        prune_checkpoints(lora_dir(cfg), cfg.checkpoints_total_limit)
        return target

    def validate(step: int) -> None:
        if validator is not None and hooks.images is not None:
            hooks.images(step, validator(step))

    unet.train()
    metrics: dict[str, float] = {}
    window: list[dict[str, float]] = []
    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), console=console, disable=not accelerator.is_main_process)
    with progress:
        task = progress.add_task("train", total=cfg.max_steps, completed=global_step, info="")
        while global_step < cfg.max_steps:
            if stream is not None:  # endless; resumes at the checkpointed shard position
                epoch_loader = map(collate_captioned, iter_batches(stream, cfg.batch_size))
            else:
                loader.set_epoch(epoch)  # accelerate's loader forwards it to the sampler and the data set on __iter__
                epoch_loader = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
            for batch in epoch_loader:
                with accelerator.accumulate(unet), accelerator.autocast():
                    pixels = batch["pixel_values"].to(accelerator.device, weight_dtype)  # (B, 3, R, R)
                    bsz = pixels.shape[0]
                    with torch.no_grad():
                        latents = encode_latents(parts.vae, pixels, weight_dtype)  # (B, 4, h, w)
                        drop = (torch.rand(bsz) < cfg.empty_prompt_prob).tolist()
                        captions = ["" if d else c for d, c in zip(drop, batch["caption"], strict=True)]
                        cond = parts.encode(captions)
                    loss, logs = method(unet, latents, cond, expand_conditioning(uncond_embed, bsz))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                window.append({"loss": float(loss.detach()), **logs})
                batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                metrics["lr"] = float(lr_scheduler.get_last_lr()[0])
                metrics["epoch"] = float(epoch if stream is None else stream.epoch)
                if stream is not None:
                    metrics["data_corrupt"] = float(stream.num_corrupt)
                window = []
                progress.update(task, advance=1, info=f"loss {metrics['loss']:.4g}")
                if hooks.metrics is not None and (global_step % cfg.log_every == 0 or global_step == cfg.max_steps):
                    hooks.metrics(global_step, metrics)
                if global_step % cfg.checkpointing_steps == 0:
                    positions = data_positions()
                    if accelerator.is_main_process:
                        save_checkpoint(global_step, positions)
                if cfg.validation_steps and global_step % cfg.validation_steps == 0 and global_step < cfg.max_steps:
                    validate(global_step)
                if global_step >= cfg.max_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
                continue
            break

    accelerator.wait_for_everyone()
    generator_dir = folder / "generator"
    if accelerator.is_main_process:
        with atomic_dir(final_dir) as tmp:
            save_lora(base_unet, tmp)
        write_generator_folder(generator_dir, base_model=_portable_model_id(cfg.base_model),
                               lora_file=final_dir / LORA_WEIGHT_NAME, schedule=schedule, discrete_steps=discrete,
                               default_steps=4 if 4 in cfg.validation_step_counts else min(cfg.validation_step_counts),
                               guidance=0.0, teacher_guidance=cfg.teacher_guidance, trained_steps=global_step,
                               method=cfg.method, pipeline=parts.kind)
        validate(global_step)
    accelerator.end_training()
    return TrainResult(folder, final_dir, generator_dir, global_step, resume_from, metrics)


def _portable_model_id(model: str) -> str:
    """An absolute path for a local folder (the generator folder may be read from elsewhere), else the hub id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
