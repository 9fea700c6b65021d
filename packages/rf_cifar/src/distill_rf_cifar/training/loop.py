"""The one training loop (EDM's ``training_loop`` pattern): it takes the loss as an argument, so the teacher and
every student recipe share it.

Accelerate (mixed precision, devices, ``accelerate launch``), AdamW with a diffusers warm-up schedule, gradient
clipping, an EMA of the weights (distill_common.models.ema), atomic checkpoints every N steps and exact resume:
model, EMA, optimizer, scheduler, RNG states and the data position ``(epoch, index)``. A non-finite loss stops
the run with :class:`TrainingDivergedError`. The loop never logs: it reports through a :class:`TrainingCallback`.

A loss that trains more than the model (a discriminator with its own optimiser, an EMA target network) subclasses
:class:`LossHooks`: the loop calls ``after_step`` after each optimiser step of the model and keeps the loss's extra
weights (``extra.safetensors``) and state (in ``training_state.pt``) in every checkpoint, so resume stays exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from distill_common import checkpoint as ckpt
from distill_common.errors import ConfigError, TrainingDivergedError
from distill_common.models.ema import EMA
from distill_common.runtime import make_accelerator, resolve_device, resolve_precision
from distill_rf_cifar.config import LoopConfig
from distill_rf_cifar.losses import LossHooks, LossOutput
from distill_rf_cifar.training.data import EpochOrder, TrainingData

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
EXTRA_FILE = "extra.safetensors"  # weights a LossHooks loss trains besides the model (e.g. discriminator heads)
CHECKPOINTS = "checkpoints"

SampleFn = Callable[[nn.Module], torch.Tensor]  # model (EMA weights) -> images (N, 3, H, W) in [0, 1]


class TrainingCallback:
    """Receives what the loop measures; the CLI layer's subclass logs it to MLflow."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_samples(self, step: int, images: torch.Tensor) -> None: ...

    def on_checkpoint(self, step: int, folder: Path) -> None: ...


@dataclass
class TrainResult:
    step: int  # global step reached
    finished: bool  # False when stopped early by ``stop_at_step``
    resumed_from: int  # 0 for a fresh start
    last_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    steps_per_second: float = float("nan")


def _bin_metrics(per_sample: list[torch.Tensor], ts: list[torch.Tensor], bins: int) -> dict[str, float]:
    loss, t = torch.cat(per_sample).float().cpu(), torch.cat(ts).float().cpu()
    which = (t * bins).long().clamp_(0, bins - 1)
    out = {}
    for b in range(bins):
        mask = which == b
        if mask.any():
            out[f"loss_t{b / bins:.2f}-{(b + 1) / bins:.2f}"] = float(loss[mask].mean())
    return out


def _accelerator(precision: str, device: str) -> Any:
    """``make_accelerator``; in a single process, a state left by an earlier run of another precision is reset."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    mixed = {"fp32": "no"}.get(precision, precision)
    if state and state.get("_mixed_precision") not in (None, mixed) and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()
    return make_accelerator(precision, device=device)


def _unwrap(accelerator: Any, model: nn.Module) -> nn.Module:
    return accelerator.unwrap_model(model)


def save_checkpoint(root: Path, step: int, model: nn.Module, ema: EMA, optimizer: Any, scheduler: Any,
                    order: EpochOrder, keep: int, hooks: LossHooks | None = None) -> Path:
    """Write checkpoint-{step}: weights and EMA as safetensors, the rest in training_state.pt; atomically."""
    target = ckpt.checkpoint_dir(root, step)
    with ckpt.atomic_dir(target) as tmp:
        ckpt.save_weights(model.state_dict(), tmp / MODEL_FILE)
        ema.save(tmp / EMA_FILE)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "data": order.state(),
        }
        if hooks is not None:
            extra = hooks.extra_weights()
            if extra:
                ckpt.save_weights({k: v.detach().contiguous() for k, v in extra.items()}, tmp / EXTRA_FILE)
            state["extra"] = hooks.extra_state()
        ckpt.save_training_state(tmp, state)
    ckpt.prune_checkpoints(root, keep)
    return target


def train(
    cfg: LoopConfig,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], LossOutput],
    data: TrainingData,
    output_dir: str | Path,
    *,
    callback: TrainingCallback | None = None,
    sample_fn: SampleFn | None = None,
    progress: bool = True,
    description: str = "train",
) -> tuple[TrainResult, nn.Module, EMA]:
    """Train ``model`` on ``loss_fn`` for ``cfg.steps`` steps, resuming from ``output_dir/checkpoints`` if present.

    Returns the result, the (unwrapped) model with its live weights and the EMA.
    """
    callback = callback or TrainingCallback()
    out = Path(output_dir)
    root = out / CHECKPOINTS
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    accelerator = _accelerator(precision, cfg.device if cfg.device != "auto" else device.type)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over {world} "
                          f"processes; use a multiple of {world}")

    torch.manual_seed(cfg.seed)  # reproducible weights-independent randomness; replaced by the RNG on resume
    order = EpochOrder(len(data), cfg.batch_size, cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    ema = EMA(model, decay=cfg.ema_decay, foreach=True)
    hooks = loss_fn if isinstance(loss_fn, LossHooks) else None
    # before a resume, so a loss's auxiliary optimiser state is restored onto its parameters' device
    loss_fn = loss_fn.to(accelerator.device) if isinstance(loss_fn, nn.Module) else loss_fn
    step = 0
    latest = ckpt.latest_checkpoint(root)
    if latest is not None:
        ckpt.load_into(model, latest / MODEL_FILE, "model")
        ema.load(latest / EMA_FILE)
        state = ckpt.load_training_state(latest)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        order.load_state(state["data"])
        step = int(state["step"])
        if hooks is not None:
            if (latest / EXTRA_FILE).is_file():
                hooks.load_extra_weights(ckpt.load_weights(latest / EXTRA_FILE, accelerator.device))
            hooks.load_extra_state(state.get("extra", {}))
    resumed_from = step
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema.to(accelerator.device)
    if latest is not None:
        ckpt.set_rng_state(state["rng"])  # last: nothing above may consume the restored generators

    stop = cfg.steps if cfg.stop_at_step is None else min(cfg.steps, cfg.stop_at_step)
    result = TrainResult(step=step, finished=step >= cfg.steps, resumed_from=resumed_from, checkpoint=latest)
    per_sample: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []
    window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
    window_extra: dict[str, list[float]] = {}  # the losses' own scalars (LossOutput.metrics, after_step)
    grad_norm = float("nan")
    run_start, run_steps = time.perf_counter(), 0
    columns = (TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    model.train()
    with Progress(*columns, disable=not (progress and main), transient=False) as bar:
        task = bar.add_task(description, total=cfg.steps, completed=step, info="")
        while step < stop:
            if world > 1:  # each rank draws its own noise and times, reproducibly from (seed, step, rank)
                torch.manual_seed(cfg.seed * 1_000_003 + step * 7919 + rank)
            # data sharded by rank: every rank takes its slice of the same global batch
            indices = order.next_indices()[rank::world]
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in data.batch(indices).items()}
            with accelerator.autocast():
                output = loss_fn(model, batch)
            loss_value = float(accelerator.reduce(output.loss.detach(), "mean") if world > 1 else output.loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDivergedError(
                    f"{description}: the loss became {loss_value} at step {step + 1} (learning rate "
                    f"{scheduler.get_last_lr()[0]:.3g}); lower the learning rate (e.g. --learning-rate "
                    f"{cfg.learning_rate / 4:.3g}) or lengthen the warm-up, and rerun (it resumes from the last checkpoint)"
                )
            accelerator.backward(output.loss)
            if cfg.grad_clip > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(_unwrap(accelerator, model))
            extra = dict(output.metrics)
            if hooks is not None:
                extra.update(hooks.after_step(_unwrap(accelerator, model)))
            for k, v in extra.items():
                window_extra.setdefault(k, []).append(float(v))
            step += 1
            run_steps += 1
            window_loss += loss_value
            window_n += 1
            per_sample.append(output.per_sample)
            ts.append(output.t)
            bar.update(task, completed=step, info=f"loss {loss_value:.4f}")

            if main and (step % cfg.log_every == 0 or step == stop):
                elapsed = time.perf_counter() - window_start
                metrics = {"loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0],
                           "steps_per_second": window_n / max(elapsed, 1e-9), "epoch": order.epoch}
                if cfg.grad_clip > 0:
                    metrics["grad_norm"] = grad_norm
                metrics.update(_bin_metrics(per_sample, ts, cfg.time_bins))
                metrics.update({k: sum(v) / len(v) for k, v in window_extra.items()})
                callback.on_metrics(step, metrics)
                result.last_metrics = metrics
                per_sample, ts, window_loss, window_n, window_start = [], [], 0.0, 0, time.perf_counter()
                window_extra = {}
            if main and sample_fn is not None and ((cfg.sample_every and step % cfg.sample_every == 0)
                                                   or step == cfg.steps):
                unwrapped = _unwrap(accelerator, model)
                unwrapped.eval()
                with ema.swapped_in(unwrapped), torch.no_grad():
                    callback.on_samples(step, sample_fn(unwrapped).cpu())
                unwrapped.train()
            if step % cfg.checkpoint_every == 0 or step == stop:
                if main:  # only the main process writes checkpoints; the others wait for it
                    result.checkpoint = save_checkpoint(root, step, _unwrap(accelerator, model), ema, optimizer,
                                                        scheduler, order, cfg.keep_checkpoints, hooks)
                    callback.on_checkpoint(step, result.checkpoint)
                accelerator.wait_for_everyone()
    result.step = step
    result.finished = step >= cfg.steps
    result.steps_per_second = run_steps / max(time.perf_counter() - run_start, 1e-9)
    model = _unwrap(accelerator, model)
    model.eval()
    return result, model, ema


def check_loop_config(cfg: LoopConfig) -> None:
    """Reject inconsistent loop options before any work starts."""
    if cfg.stop_at_step is not None and cfg.stop_at_step < 1:
        raise ConfigError(f"--stop-at-step must be >= 1, got {cfg.stop_at_step}")
