"""The one training loop of ``distill prune train``: every recipe is a configuration of the components it
composes (student construction, timestep sampler, caption dropout, loss terms and their weights, LR schedule,
EMA, periodic evaluation). It never logs by itself: numbers go to a ``reporter`` (``log_metrics(metrics,
step)`` / ``log_image(image, artifact_file)``, e.g. a ``distill_common.tracking.TrackingRun``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from distill_common.checkpoint import (
    atomic_dir,
    checkpoint_dir,
    latest_checkpoint,
    load_training_state,
    load_weights,
    prune_checkpoints,
    save_training_state,
    save_weights,
    write_json,
)
from distill_common.config import to_dict
from distill_common.errors import ConfigError, ModelLoadError, TrainingDivergedError
from distill_sd_prune.architecture.complexity import count_parameters, unet_macs
from distill_sd_prune.architecture.pruning import plain_config
from distill_sd_prune.architecture.student import (
    budget_label,
    build_student,
    feature_block_pairs,
    load_student_unet,
)
from distill_sd_prune.losses.balancer import MagnitudeBalancer
from distill_sd_prune.losses.feature_hooks import FeatureRecorder, unwrap_model
from distill_sd_prune.losses.objective import DistillObjective, LossWeights
from distill_sd_prune.losses.terms import feature_kd, noise_mse, output_kd
from distill_sd_prune.schedules import (
    CaptionDropoutSchedule,
    KDAlphaSchedule,
    ProgressiveChain,
    UniformTimesteps,
    build_lr_scheduler,
    training_progress,
)
from distill_sd_prune.training.config import TrainConfig
from distill_sd_prune.training.randomness import step_generator
from distill_sd_prune.training.student_model import DistillStudent

CHECKPOINTS = "checkpoints"
FINAL = "final"
CHECKPOINT_INFO = "checkpoint.json"
PERIODIC_PROTOCOL = "periodic_eval_protocol.json"  # the stamp of the periodic evaluation's protocol (cifar10)


class Reporter(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_image(self, image: Any, artifact_file: str) -> None: ...


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    last_metrics: dict[str, float]
    resumed_from: int | None
    student_info: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def checkpoint_run_id(output_dir: str | Path) -> str | None:
    """The MLflow run id stored in the latest checkpoint (to continue the same run on resume)."""
    latest = latest_checkpoint(Path(output_dir) / CHECKPOINTS)
    if latest is None or not (latest / CHECKPOINT_INFO).is_file():
        return None
    return json.loads((latest / CHECKPOINT_INFO).read_text()).get("run_id")


@dataclass
class _Student:
    unet: Any
    info: dict[str, Any]


def _make_student(cfg: TrainConfig, teacher: Any) -> _Student:
    if cfg.student.unet is not None:
        from distill_sd_prune.architecture.student import read_prune_map

        unet = load_student_unet(cfg.student.unet)
        prepared = (
            read_prune_map(cfg.student.unet) if (Path(cfg.student.unet) / "prune_map.json").is_file() else {}
        )
        plan = prepared.get("plan", cfg.student.plan)
        width = float(prepared.get("width", cfg.student.width))
        init = prepared.get("init", "prepared")
    else:
        build = build_student(teacher, cfg.student.plan, cfg.student.width, cfg.student.init, seed=cfg.seed)
        unet, plan, width, init = build.unet, cfg.student.plan, cfg.student.width, cfg.student.init
    info = {
        "plan": plan,
        "width": width,
        "init": init,
        "budget": budget_label(plan, width),
        "params": count_parameters(unet),
        "teacher_params": count_parameters(teacher),
    }
    return _Student(unet, info)


def _select_pairs(cfg: TrainConfig, student: Any, teacher_config: Any, plan: str) -> dict[str, str]:
    if not cfg.loss.feature_kd_weight:
        return {}
    pairs = feature_block_pairs(student, teacher_config, plan)
    if cfg.loss.feature_blocks:
        unknown = [b for b in cfg.loss.feature_blocks if b not in pairs]
        if unknown:
            from distill_common.errors import unknown_choice

            raise unknown_choice("feature KD block", unknown[0], pairs)
        pairs = {b: pairs[b] for b in cfg.loss.feature_blocks}
    return pairs


def train(
    cfg: TrainConfig,
    reporter: Reporter | None = None,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    run_id: str | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train a student by ``cfg`` (recipe fields resolved here); resumes from the latest checkpoint when
    asked.

    ``on_step(step, metrics)`` is called after every optimiser step (after its checkpoint, if any).
    """
    from distill_common.models import load_sd_components
    from distill_common.models.ema import EMA
    from distill_common.runtime import (
        make_accelerator,
        resolve_device,
        resolve_precision,
        seed_everything,
        torch_dtype,
    )
    from distill_sd_prune.data.training_data import (
        ShardTrainingStream,
        TrainingStream,
        load_training_captions,
        open_or_build_cache,
    )
    from distill_sd_prune.sampling.pipeline import check_resolution, make_scheduler

    cfg = cfg.resolved()
    out = Path(cfg.output_dir)
    ckpt_root = out / CHECKPOINTS
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a new run may use another precision; the process-group state is kept
    accelerator = make_accelerator(precision, cfg.gradient_accumulation, cfg.device)
    device = accelerator.device
    weight_dtype = torch.float32 if precision == "fp32" else torch_dtype(precision)
    seed_everything(cfg.seed)
    main = accelerator.is_main_process

    # -- models ----------------------------------------------------------------------------------------------
    components = load_sd_components(cfg.teacher_model, dtype=torch.float32, device="cpu")
    teacher = components.unet.eval().requires_grad_(False)
    student = _make_student(cfg, teacher)
    check_resolution(cfg.data.resolution, components.vae_scale_factor, student.unet.config)
    check_resolution(cfg.data.resolution, components.vae_scale_factor, teacher.config)
    latent_size = cfg.data.resolution // components.vae_scale_factor
    macs = unet_macs(student.unet.config, latent_size)
    student.info.update(
        {
            "macs": macs.total,
            "macs_conv_linear": macs.conv_linear,
            "teacher_macs": unet_macs(teacher.config, latent_size).total,
            "latent_size": latent_size,
        }
    )
    pairs = _select_pairs(cfg, student.unet, teacher.config, student.info["plan"])
    init = student.info["init"] if student.info["init"] in ("slice", "project") else "slice"
    model = DistillStudent(student.unet.train(), pairs, teacher, init)
    for frozen in (teacher, components.vae, components.text_encoder):
        frozen.requires_grad_(False).eval().to(device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    teacher_recorder = FeatureRecorder(teacher, list(pairs.values()), detach=True) if pairs else None

    # -- data ------------------------------------------------------------------------------------------------
    if cfg.data.shards:  # streamed WebDataset shards, split by rank; the position is checkpointed
        stream = ShardTrainingStream(
            cfg.data.shards,
            components,
            resolution=cfg.data.resolution,
            center_crop=cfg.data.center_crop,
            random_flip=cfg.data.random_flip,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=device,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
        )
    else:
        dataset = load_training_captions(
            cfg.data.source,
            cfg.data.root,
            cfg.data.split,
            cfg.data.resolution,
            limit=cfg.data.limit,
            center_crop=cfg.data.center_crop,
            random_flip=cfg.data.random_flip,
            seed=cfg.seed,
            show_progress=show_progress and main,
        )
        cache = None
        if cfg.data.cache:
            cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out.parent / "latent_cache"
            with accelerator.main_process_first():
                cache = open_or_build_cache(
                    dataset,
                    components,
                    cache_root,
                    str(cfg.teacher_model),
                    cfg.data.split,
                    cfg.data.resolution,
                    cfg.data.center_crop,
                    cfg.data.random_flip,
                    torch_dtype(cfg.data.cache_dtype),
                    show_progress=show_progress and main,
                )
        stream = TrainingStream(
            dataset,
            components,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=device,
            cache=cache,
            num_workers=cfg.data.num_workers,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
        )

    # -- optimisation
    # --------------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_scheduler = build_lr_scheduler(
        cfg.schedule.lr,
        optimizer,
        cfg.max_steps,
        cfg.learning_rate,
        cfg.schedule.warmup_steps,
        cfg.schedule.onecycle_pct_start,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = unwrap_model(accelerator.unwrap_model(model))
    ema = EMA(bare.unet, cfg.schedule.ema_decay, use_ema_warmup=True).to(device) if cfg.schedule.ema else None
    weights = LossWeights(cfg.loss.task_weight, cfg.loss.output_kd_weight, cfg.loss.feature_kd_weight)
    alpha = (
        KDAlphaSchedule(cfg.loss.kd_alpha_start, cfg.loss.kd_alpha_end)
        if cfg.loss.kd_alpha == "linear"
        else None
    )
    balancer = MagnitudeBalancer(cfg.loss.balance_beta) if cfg.loss.balance else None
    objective = DistillObjective(weights, alpha, balancer)
    noise_scheduler = make_scheduler("ddpm", components.scheduler.config)
    num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
    sampler = (
        ProgressiveChain(
            noise_scheduler.config,
            cfg.schedule.chain_start,
            cfg.schedule.chain_end,
            cfg.schedule.chain_stages,
        )
        if cfg.schedule.timesteps == "progressive"
        else UniformTimesteps(num_train_timesteps)
    )
    dropout = CaptionDropoutSchedule(cfg.schedule.caption_dropout_start, cfg.schedule.caption_dropout_end)
    prediction_type = noise_scheduler.config.prediction_type
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    # -- resume ----------------------------------------------------------------------------------------------
    step = micro = 0
    resumed_from = None
    latest = latest_checkpoint(ckpt_root) if cfg.resume else None
    if latest is not None:
        saved_config = json.loads((latest / "student_config.json").read_text())
        if saved_config != json.loads(json.dumps(plain_config(bare.unet.config), default=list)):
            raise ModelLoadError(
                f"checkpoint {latest} was written for another student architecture; use its config "
                "or a new --output-dir"
            )
        state = load_training_state(latest)
        bare.load_state_dict(load_weights(latest / "student.safetensors", device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None:
            ema.load(latest / "ema.safetensors")
        if balancer is not None and state.get("balancer"):
            balancer.load_state_dict(state["balancer"])
        step, micro = int(state["step"]), int(state["micro_batch"])
        if isinstance(stream, ShardTrainingStream):
            positions = state.get("data") or []
            if len(positions) != accelerator.num_processes:
                raise ConfigError(f"checkpoint {latest} holds no shard position for {accelerator.num_processes} "
                                  "process(es); resume with the data and process count it was written with")
            stream.load_state_dict(positions[accelerator.process_index])
        run_id = run_id or state.get("run_id")
        resumed_from = step

    evaluator = None
    if cfg.eval.every and main and cfg.data.source == "cifar10":
        from distill_sd_prune.evaluation.scoring import (
            PeriodicProtocolEvaluator,
            SamplingSetting,
            ScoringProtocol,
        )

        # the comparison's scoring protocol at a smaller N, stamped as periodic (evaluation/scoring.py)
        evaluator = PeriodicProtocolEvaluator(
            components,
            protocol=ScoringProtocol(
                cfg.eval.num_images, reference_n=cfg.eval.reference_n, seed=cfg.seed, purpose="periodic",
                feature_precision=cfg.eval.feature_precision,
            ),
            setting=SamplingSetting("periodic", cfg.eval.steps, cfg.eval.guidance, cfg.eval.scheduler),
            resolution=cfg.data.resolution,
            classifier=cfg.eval.classifier,
            lpips_net=cfg.eval.lpips_net,
            batch_size=cfg.eval.batch_size,
            data_root=cfg.data.root,
            device=device,
            autocast_dtype=None if weight_dtype == torch.float32 else weight_dtype,
        )
        write_json(out / PERIODIC_PROTOCOL, evaluator.protocol)
        if reporter is not None and hasattr(reporter, "set_tags"):
            reporter.set_tags({"periodic_eval.protocol": evaluator.protocol_json()})
    elif cfg.eval.every and main:
        from distill_sd_prune.evaluation.periodic import PeriodicEvaluator

        evaluator = PeriodicEvaluator(
            components,
            data_root=cfg.data.root,
            resolution=cfg.data.resolution,
            num_images=cfg.eval.num_images,
            steps=cfg.eval.steps,
            guidance=cfg.eval.guidance,
            scheduler=cfg.eval.scheduler,
            lpips_net=cfg.eval.lpips_net,
            batch_size=cfg.eval.batch_size,
            seed=cfg.seed,
            device=device,
            autocast_dtype=None if weight_dtype == torch.float32 else weight_dtype,
        )

    def report(metrics: dict[str, float], at: int) -> None:
        if reporter is not None and main:
            reporter.log_metrics(metrics, step=at)

    if main and reporter is not None and resumed_from is None:
        report(
            {
                "student/params": student.info["params"],
                "student/gmacs": macs.total / 1e9,
                "teacher/params": student.info["teacher_params"],
                "teacher/gmacs": student.info["teacher_macs"] / 1e9,
                **({"data/num_shards": len(stream.shards.urls)} if isinstance(stream, ShardTrainingStream)
                   else {"data/num_samples": len(stream)}),
            },
            0,
        )

    def micro_step(batch: Any, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        m, rank = batch.index, accelerator.process_index
        latents = batch.latents.to(device)  # (B, 4, h, w)
        bsz = latents.shape[0]
        noise = torch.randn(
            latents.shape, generator=step_generator(cfg.seed, "noise", m, rank, device), device=device
        )
        timesteps = sampler.sample(bsz, progress, step_generator(cfg.seed, "timesteps", m, rank)).to(device)
        text, dropped = dropout.apply(
            batch.text_embeds,
            stream.empty_embed,
            progress,
            step_generator(cfg.seed, "caption_dropout", m, rank),
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        teacher_pred = None
        if weights.needs_teacher:
            with torch.no_grad():
                if teacher_recorder is not None:
                    teacher_recorder.clear()
                teacher_pred = teacher(noisy.to(weight_dtype), timesteps, text.to(weight_dtype)).sample
        prediction, student_features = model(noisy, timesteps, text)
        terms = {"task": noise_mse(prediction, target)}
        extra: dict[str, float] = {}
        if weights.output_kd > 0:
            terms["output_kd"] = output_kd(prediction, teacher_pred)
        if weights.feature_kd > 0:
            terms["feature_kd"], per_block = feature_kd(student_features, teacher_recorder.features, pairs)
            extra.update({f"loss/feature_kd/{k}": float(v.detach()) for k, v in per_block.items()})
        total, values = objective(terms, progress)
        if not math.isfinite(values["loss/total"]):
            terms_text = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise TrainingDivergedError(
                f"the loss became {values['loss/total']} at step {step} ({terms_text}); "
                "lower --learning-rate, keep --max-grad-norm on, or train in --precision fp32"
            )
        values.update(extra)
        values["caption_dropout/fraction"] = float(dropped.float().mean())
        values["timestep/mean"] = float(timesteps.float().mean())
        values["timestep/snr_mean"] = float(
            (alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])).mean()
        )
        return total, values

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        positions = None
        if isinstance(stream, ShardTrainingStream):  # every process's shard position (a collective call)
            from accelerate.utils import gather_object

            positions = list(gather_object([stream.state_dict()]))
        if not main:
            return
        with atomic_dir(checkpoint_dir(ckpt_root, step)) as tmp:
            save_weights(bare.state_dict(), tmp / "student.safetensors")
            if ema is not None:
                ema.save(tmp / "ema.safetensors")
            save_training_state(
                tmp,
                {
                    "step": step,
                    "micro_batch": micro,
                    "run_id": run_id,
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "balancer": balancer.state_dict() if balancer is not None else {},
                    "data": positions,
                },
            )
            write_json(
                tmp / "student_config.json",
                json.loads(json.dumps(plain_config(bare.unet.config), default=list)),
            )
            write_json(
                tmp / CHECKPOINT_INFO,
                {
                    "step": step,
                    "micro_batch": micro,
                    "run_id": run_id,
                    "recipe": cfg.recipe,
                    "config": to_dict(cfg),
                },
            )
        prune_checkpoints(ckpt_root, cfg.keep_checkpoints)

    def evaluate_now() -> None:
        if evaluator is None:
            return
        if ema is not None:
            with ema.swapped_in(bare.unet):
                metrics, images = evaluator(bare.unet)
        else:
            metrics, images = evaluator(bare.unet)
        report(metrics, step)
        history.append({"step": step, **metrics})
        if reporter is not None:
            from torchvision.utils import make_grid

            reporter.log_image(make_grid(images, nrow=min(8, len(images))), f"samples/step_{step:07d}.png")

    # -- loop ------------------------------------------------------------------------------------------------
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    history: list[dict[str, float]] = []
    batches = stream.iterate(start=micro)
    last: dict[str, float] = {}
    model.train()
    columns = (
        TextColumn("train {task.fields[recipe]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"),
    )
    with Progress(*columns, disable=not (show_progress and main), transient=False) as bar:
        task = bar.add_task("train", total=cfg.max_steps, completed=step, recipe=cfg.recipe, loss="-")
        while step < cfg.max_steps:
            progress = training_progress(step, cfg.max_steps)
            reports = []
            for _ in range(cfg.gradient_accumulation):
                batch = next(batches)
                with accelerator.accumulate(model):
                    loss, values = micro_step(batch, progress)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        values["grad_norm"] = float(
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                reports.append(values)
            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            if ema is not None:
                values_ema = ema.update(bare.unet)
            step += 1
            last = {
                k: sum(r[k] for r in reports if k in r) / sum(1 for r in reports if k in r)
                for k in {k for r in reports for k in r}
            }
            last.update(
                {
                    "lr": lr,
                    "caption_dropout/rate": dropout.rate(progress),
                    "timestep/chain_length": float(sampler.chain_length(progress)),
                    "progress": progress,
                }
            )
            if ema is not None:
                last["ema/decay"] = values_ema
            if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1:
                report(last, step)
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.max_steps):
                evaluate_now()
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint()
            bar.update(task, completed=step, loss=f"{last['loss/total']:.4f}")
            if on_step is not None:
                on_step(step, last)

    final_dir = None
    accelerator.wait_for_everyone()
    if main:
        final_dir = export_student(
            cfg, bare.unet, ema, student.info, components.vae_scale_factor, out / FINAL
        )
    if teacher_recorder is not None:
        teacher_recorder.remove()
    return TrainResult(out, final_dir, step, last, resumed_from, student.info, history)


def export_student(
    cfg: TrainConfig, unet: Any, ema: Any, info: dict[str, Any], vae_scale_factor: int, folder: Path
) -> Path:
    """Write the final generator folder (EMA weights when an EMA was kept)."""
    from distill_sd_prune.sampling.generator import write_generator_folder

    fields = dict(
        recipe=cfg.recipe,
        resolution=cfg.data.resolution,
        scheduler="ddpm",
        train_steps=cfg.max_steps,
        bundle_base=cfg.bundle_base,
        weights="ema" if ema is not None else "live",
        **info,
    )
    if ema is not None:
        with ema.swapped_in(unet):
            return write_generator_folder(folder, str(cfg.teacher_model), unet=unet, **fields)
    return write_generator_folder(folder, str(cfg.teacher_model), unet=unet, **fields)
