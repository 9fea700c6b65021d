"""The few-step LCM schedule that sampling and training share (Luo et al. 2023, "Latent Consistency Models").

``LCMScheduler`` keeps a grid of ``original_inference_steps`` (50) "origin" timesteps, every
``1000 // 50 = 20``-th training timestep ending at 999, and reads the inference steps from its end at the
evenly spread indices ``floor(i * 50 / n)``: 2 steps -> [999, 499], 4 -> [999, 759, 499, 259],
8 -> [999, 879, 759, 639, 499, 379, 259, 139].
Its ``timestep_spacing`` option does not change these (checked in the tests); we still set "trailing", as the
Flash Diffusion and LCM-LoRA model cards do.

:class:`FlashSchedule` is the one object that both the generator (``.scheduler()``) and the trainer
(``.grid(...)``, ``.timestep_sampler(...)``) derive their timesteps from, so "train on exactly the timesteps
inference uses" cannot drift; :meth:`FlashSchedule.verify` refuses a scheduler whose steps differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distill_common.errors import ConfigError

LCM_TIMESTEP_SPACING = "trailing"
DEFAULT_ORIGINAL_STEPS = 50
# Keys of a base (e.g. PNDM) scheduler config that describe the noise schedule; the rest is sampler-specific.
NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type", "rescale_betas_zero_snr")


@dataclass(frozen=True)
class FlashSchedule:
    """LCM sampling schedule built from the base model's noise schedule (``scheduler/scheduler_config.json``)."""

    base_config: Mapping[str, Any] = field(default_factory=dict)
    original_inference_steps: int = DEFAULT_ORIGINAL_STEPS

    @classmethod
    def from_scheduler(cls, scheduler: Any, original_inference_steps: int = DEFAULT_ORIGINAL_STEPS) -> FlashSchedule:
        """From any diffusers scheduler (or its config) of the base model."""
        config = getattr(scheduler, "config", scheduler)
        noise = {k: config[k] for k in NOISE_SCHEDULE_KEYS if k in config and config[k] is not None}
        if original_inference_steps < 1:
            raise ConfigError(f"--lcm-original-steps must be positive, got {original_inference_steps}; use 50")
        return cls(noise, int(original_inference_steps))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.base_config.get("num_train_timesteps", 1000))

    @property
    def prediction_type(self) -> str:
        return str(self.base_config.get("prediction_type", "epsilon"))

    def scheduler(self):
        """A fresh ``LCMScheduler`` (trailing spacing) on the base model's betas: what the generator samples with."""
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(
            {**self.base_config, "original_inference_steps": self.original_inference_steps,
             "timestep_spacing": LCM_TIMESTEP_SPACING, "set_alpha_to_one": False, "steps_offset": 1}
        )

    def timesteps(self, num_steps: int) -> list[int]:
        """The inference timesteps (descending) for ``num_steps`` LCM steps."""
        if not 1 <= num_steps <= self.original_inference_steps:
            raise ConfigError(
                f"LCM sampling supports 1 to {self.original_inference_steps} steps, got {num_steps}; "
                f"pass --steps within that range (or raise --lcm-original-steps)"
            )
        sched = self.scheduler()
        sched.set_timesteps(num_steps)
        return [int(t) for t in sched.timesteps]

    def grid(self, step_counts: Sequence[int]) -> torch.Tensor:
        """Sorted union of the inference timesteps of every step count: the discrete training grid."""
        if not step_counts:
            raise ConfigError("the discrete timestep grid needs at least one step count; pass --discrete-steps 2 4 8")
        values = sorted({t for n in step_counts for t in self.timesteps(int(n))})
        return torch.tensor(values, dtype=torch.long)

    def verify(self, scheduler: Any, step_counts: Sequence[int]) -> None:
        """Refuse a sampler whose timesteps differ from this schedule's for any of ``step_counts``."""
        for n in step_counts:
            scheduler.set_timesteps(int(n))
            got = [int(t) for t in scheduler.timesteps]
            want = self.timesteps(int(n))
            if got != want:
                raise ConfigError(
                    f"the sampler's {n}-step timesteps {got} differ from the training grid {want}; train and "
                    "sample with the same LCM schedule (same base scheduler config and --lcm-original-steps)"
                )

    def verify_noise_schedule(self, noise_scheduler: Any) -> None:
        """Refuse a training noise scheduler whose alphas differ from the sampler's (noise added != noise removed)."""
        lcm = self.scheduler()
        a, b = noise_scheduler.alphas_cumprod.double(), lcm.alphas_cumprod.double()
        if a.shape != b.shape or not torch.allclose(a, b, rtol=0, atol=1e-7):
            raise ConfigError(
                "the training noise schedule differs from the LCM sampler's; build both from the base model's "
                "scheduler config"
            )

    def timestep_sampler(self, discrete_steps: Sequence[int] | None = None) -> TimestepSampler:
        """Uniform over all training timesteps, or uniform over :meth:`grid` when ``discrete_steps`` is given."""
        if discrete_steps:
            return TimestepSampler(self.grid(discrete_steps))
        return TimestepSampler(torch.arange(self.num_train_timesteps, dtype=torch.long))

    def manifest(self, discrete_steps: Sequence[int] | None = None) -> dict[str, Any]:
        """What ``generator.json`` records so a loader can check it samples on the training grid."""
        out: dict[str, Any] = {"scheduler": "LCMScheduler", "timestep_spacing": LCM_TIMESTEP_SPACING,
                               "lcm_original_steps": self.original_inference_steps}
        if discrete_steps:
            out["discrete_timesteps"] = {str(n): self.timesteps(int(n)) for n in discrete_steps}
        return out


@dataclass(frozen=True)
class TimestepSampler:
    """Draws training timesteps uniformly from ``values`` (all of 0..T-1, or the LCM inference grid)."""

    values: torch.Tensor  # (K,) long

    def __call__(self, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(0, self.values.numel(), (batch_size,), generator=generator)
        return self.values[idx].to(device)  # (B,)

    @property
    def is_discrete(self) -> bool:
        return self.values.numel() < int(self.values.max()) + 1
