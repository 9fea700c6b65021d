"""Learning-rate schedules: constant (after a linear warm-up) or OneCycleLR (Smith & Topin 2019) over the
run."""

from __future__ import annotations

import torch

from distill_common.errors import ConfigError, unknown_choice

LR_SCHEDULES = ("constant", "onecycle")


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    learning_rate: float,
    warmup_steps: int = 0,
    onecycle_pct_start: float = 0.3,
):
    """A ``torch.optim.lr_scheduler`` stepped once per optimiser step."""
    if name == "constant":
        warm = max(0, int(warmup_steps))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0
        )
    if name == "onecycle":
        if not 0.0 < onecycle_pct_start < 1.0:
            raise ConfigError(f"OneCycle pct_start must lie in (0, 1), got {onecycle_pct_start}")
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=learning_rate,
            total_steps=max(2, total_steps),
            pct_start=onecycle_pct_start,
            anneal_strategy="cos",
        )
    raise unknown_choice("learning-rate schedule", name, LR_SCHEDULES)
