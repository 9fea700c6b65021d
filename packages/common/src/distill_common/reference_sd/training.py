"""One resumable training loop for the reference text-to-image model's components (VAE, UNet + text encoder) and
the evaluation classifier.

A component is a :class:`TrainingTask`: the modules it trains, a ``loss(batch_generator)`` and an ``export``.
The loop is the same for all: AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CPUs
with bf16 units, an EMA of the weights, and an atomic ``checkpoint-{step}`` every ``checkpoint_every`` steps.
Each step draws its batch from a generator seeded by ``(seed, step)``, so a killed run resumes bit-identically
from its last checkpoint without saving data-loader state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
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
from distill_common.errors import ConfigError
from distill_common.models.ema import EMA

LR_SCHEDULES = ("cosine", "constant")


@dataclass
class ComponentTrainConfig:
    """Options of one component's training run (the loop's, not the architecture's)."""

    steps: int = 1000  # optimizer steps in all (a resumed run continues up to this)
    batch_size: int = 64  # images per step
    learning_rate: float = 5e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 200  # linear warm-up from 0
    lr_schedule: str = "cosine"  # cosine: decay to min_lr_ratio x peak at `steps`; constant: hold the peak
    min_lr_ratio: float = 0.05  # floor of the cosine decay, as a fraction of the peak
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema_decay: float = 0.999  # EMA of the weights, exported instead of the live ones (0 = off)
    precision: str = "bf16"  # autocast dtype on the CPU: bf16 or fp32
    checkpoint_every: int = 250  # steps between atomic checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 25  # steps between logged losses
    seed: int = 0  # seeds the per-step batch generators

    def validate(self) -> None:
        ints = {"steps": self.steps, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every,
                "log_every": self.log_every}
        for name, value in ints.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name, value in {"learning_rate": self.learning_rate, "weight_decay": self.weight_decay,
                            "grad_clip": self.grad_clip, "ema_decay": self.ema_decay,
                            "min_lr_ratio": self.min_lr_ratio}.items():
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.learning_rate <= 0 or self.ema_decay >= 1 or self.min_lr_ratio > 1:
            raise ConfigError("learning_rate must be > 0, ema_decay < 1 and min_lr_ratio <= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: bf16, fp32")


class TrainingTask(Protocol):
    name: str
    modules: Mapping[str, torch.nn.Module]  # trained modules by name (weights file per name)

    def loss(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def export(self, folder: Path) -> None: ...


def lr_factor(step: int, cfg: ComponentTrainConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _trainable(task: TrainingTask) -> list[torch.nn.Parameter]:
    return [p for m in task.modules.values() for p in m.parameters() if p.requires_grad]


def train_component(task: TrainingTask, cfg: ComponentTrainConfig, run_dir: str | Path, *,
                    log: Callable[[dict[str, float], int], None] | None = None,
                    progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train ``task`` to ``cfg.steps`` in ``run_dir`` (resuming its newest checkpoint) and export it to
    ``run_dir/export``. Returns a summary (steps, wall time of this process, last losses)."""
    cfg.validate()
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    params = _trainable(task)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    emas = {name: EMA(m, cfg.ema_decay, only_trainable=True) for name, m in task.modules.items()
            if cfg.ema_decay > 0 and any(p.requires_grad for p in m.parameters())}
    start, elapsed_before = 0, 0.0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = load_training_state(latest)
        for name, module in task.modules.items():
            module.load_state_dict(load_weights(latest / f"{name}.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        for name, ema in emas.items():
            ema.load_state_dict(state["ema"][name])
        start, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
    autocast = cfg.precision == "bf16"
    for m in task.modules.values():
        m.train()
    t0, last = time.perf_counter(), {}
    window: list[dict[str, float]] = []

    def save(step: int) -> None:
        with atomic_dir(checkpoint_dir(ckpt_root, step)) as tmp:
            for name, module in task.modules.items():
                save_weights(module.state_dict(), tmp / f"{name}.safetensors")
            save_training_state(tmp, {"step": step, "optimizer": optimizer.state_dict(),
                                      "ema": {n: e.state_dict() for n, e in emas.items()},
                                      "elapsed_s": elapsed_before + time.perf_counter() - t0,
                                      "config": asdict(cfg)})
        prune_checkpoints(ckpt_root, cfg.keep_checkpoints)

    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, parts = task.loss(step_generator(cfg.seed, step), cfg.batch_size)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{task.name}: loss became {loss.item()} at step {step + 1}; lower the "
                                     f"learning rate (now {cfg.learning_rate:g}) and resume from the last checkpoint")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        for name, ema in emas.items():
            ema.update(task.modules[name])
        window.append({"loss": loss.item(), **parts})
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            last = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            last["lr"] = optimizer.param_groups[0]["lr"]
            window = []
            if log is not None:
                log(last, done)
        if progress is not None:
            progress(done, cfg.steps, last)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(done)
    for name, ema in emas.items():
        ema.copy_to(task.modules[name])
    for m in task.modules.values():
        m.eval()
    with atomic_dir(run_dir / "export") as tmp:
        task.export(tmp)
    elapsed = elapsed_before + time.perf_counter() - t0
    summary = {"task": task.name, "steps": cfg.steps, "images_seen": cfg.steps * cfg.batch_size,
               "wall_time_s": round(elapsed, 1), "last": last, "config": asdict(cfg)}
    write_json(run_dir / "summary.json", summary)
    return summary
