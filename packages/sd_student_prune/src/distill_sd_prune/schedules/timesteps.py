"""Training timestep samplers: uniform over the full chain, or the progressive DDPM chain of the seed's V1.

**Progressive chain.** Training is split into ``stages`` equal parts; in stage k (k = 0 … S-1) the chain has
``N_k = round(N_start * (N_end / N_start) ** (k / (S - 1)))`` steps (geometric from ``N_start`` to ``N_end``),
and t is drawn uniformly from that chain's timesteps. A chain of N < T steps is exactly the grid that
``DDPMScheduler.set_timesteps(N)`` produces from the teacher's scheduler config (so the last stage trains on
the very timesteps that N_end-step DDPM sampling visits); N >= T is the full range 0 … T-1. Training progress
p in [0, 1] is in stage ``min(S - 1, floor(p * S))``: the first step uses N_start, the last step N_end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from distill_common.errors import ConfigError

TIMESTEP_SAMPLERS = ("uniform", "progressive")


@dataclass
class UniformTimesteps:
    num_train_timesteps: int = 1000

    def chain_length(self, progress: float) -> int:
        return self.num_train_timesteps

    def sample(self, batch: int, progress: float, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)


@dataclass
class ProgressiveChain:
    scheduler_config: Mapping[str, Any]
    start_steps: int = 1000
    end_steps: int = 25
    stages: int = 4
    _grids: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.stages < 1 or self.end_steps < 1 or self.start_steps < self.end_steps:
            raise ConfigError(
                f"progressive chain needs stages >= 1 and start >= end >= 1 (got {self.stages} stages, "
                f"{self.start_steps} -> {self.end_steps} steps); "
                "pass e.g. --schedule-chain-start 1000 --schedule-chain-end 25"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def stage(self, progress: float) -> int:
        return min(self.stages - 1, max(0, math.floor(progress * self.stages)))

    def stage_lengths(self) -> list[int]:
        if self.stages == 1:
            return [self.end_steps]
        ratio = self.end_steps / self.start_steps
        return [int(round(self.start_steps * ratio ** (k / (self.stages - 1)))) for k in range(self.stages)]

    def chain_length(self, progress: float) -> int:
        return self.stage_lengths()[self.stage(progress)]

    def grid(self, length: int) -> torch.Tensor:
        """The chain's timesteps (descending for N < T, as the scheduler lists them)."""
        if length not in self._grids:
            if length >= self.num_train_timesteps:
                self._grids[length] = torch.arange(self.num_train_timesteps - 1, -1, -1)
            else:
                from diffusers import DDPMScheduler

                scheduler = DDPMScheduler.from_config(dict(self.scheduler_config))
                scheduler.set_timesteps(length)
                self._grids[length] = scheduler.timesteps.clone().long()
        return self._grids[length]

    def timesteps_at(self, progress: float) -> torch.Tensor:
        return self.grid(self.chain_length(progress))

    def sample(self, batch: int, progress: float, generator: torch.Generator | None = None) -> torch.Tensor:
        grid = self.timesteps_at(progress)
        return grid[torch.randint(0, len(grid), (batch,), generator=generator)]
