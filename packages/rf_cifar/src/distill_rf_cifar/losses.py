"""Losses as small classes with one call, ``loss(model, batch) -> LossOutput`` (the EDM pattern), so one training
loop serves the teacher and every student. Conventions of flow.py: x_t = t x1 + (1 - t) x0, target x1 - x0.

Batches: images ``{"x1": (B, 3, 32, 32) in [-1, 1], "y": (B,)}``; pairs ``{"x0": noise, "x1": teacher image, "y"}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill_common.errors import ConfigError, unknown_choice
from distill_rf_cifar.flow import drop_labels, guided_velocity, interpolate, time_sampler, velocity_target


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to minimise
    per_sample: torch.Tensor  # (B,) detached, for per-t-bin logging
    t: torch.Tensor  # (B,) the time of each sample


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().mean(dim=(1, 2, 3))  # (B,)


def _null_class(model: nn.Module) -> int:
    return model.null_class if hasattr(model, "null_class") else model.module.null_class


class RectifiedFlowLoss(nn.Module):
    """The teacher: ||v(x_t, t, y~) - (x1 - x0)||^2 with fresh noise, t from the time sampler and label dropout
    (Liu et al. 2023, Eq. (2))."""

    def __init__(self, time_sampler_name: str = "logit_normal", label_dropout: float = 0.1) -> None:
        super().__init__()
        self.sample_t = time_sampler(time_sampler_name)
        self.label_dropout = label_dropout

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x1, y = batch["x1"], batch["y"]
        x0 = torch.randn_like(x1)
        t = self.sample_t(x1.shape[0], device=x1.device)
        y = drop_labels(y, _null_class(model), self.label_dropout)
        per = _mse(model(interpolate(x0, x1, t), t, y), velocity_target(x0, x1))
        return LossOutput(per.mean(), per.detach(), t.detach())


class _EndpointDistance(nn.Module):
    """L2 on the velocity, or LPIPS (Zhang et al. 2018) between the predicted image x_t + (1 - t) v and x1."""

    def __init__(self, distance: str = "l2", lpips_resize: int = 224) -> None:
        super().__init__()
        if distance not in ("l2", "lpips"):
            raise unknown_choice("distillation distance", distance, ("l2", "lpips"))
        self.distance = distance
        self.lpips_resize = lpips_resize
        self.lpips = None
        if distance == "lpips":
            from distill_eval.lpips_metric import LPIPSMetric

            self.lpips = LPIPSMetric(net="alex", value_range=(-1.0, 1.0))

    def per_sample(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if self.lpips is None:
            return _mse(v, velocity_target(x0, x1))
        pred = xt.float() + (1 - t.view(-1, 1, 1, 1)) * v.float()  # (B, 3, H, W) the image one Euler step reaches
        target = x1.float()
        if self.lpips_resize and self.lpips_resize != pred.shape[-1]:
            size = (self.lpips_resize, self.lpips_resize)
            pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=size, mode="bilinear", align_corners=False)
        return self.lpips(pred, target)


class KStepDistillationLoss(nn.Module):
    """k-step distillation from teacher pairs (Liu et al. 2023, Sec. 2.3): t is drawn from the k fixed points
    {0, 1/k, ..., (k-1)/k} that k-step Euler visits, x_t lies on the straight line between the pair's noise and
    image, and the target is the pair's velocity x1 - x0, so k Euler steps from x0 land on the teacher's x1."""

    def __init__(self, k: int = 4, distance: str = "l2", lpips_resize: int = 224) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"k-step distillation needs k >= 1, got {k}; pass --options-k 4")
        self.k = k
        self.endpoint = _EndpointDistance(distance, lpips_resize)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x0, x1, y = batch["x0"], batch["x1"], batch["y"]
        t = torch.randint(0, self.k, (x1.shape[0],), device=x1.device).to(x1.dtype) / self.k
        xt = interpolate(x0, x1, t)
        per = self.endpoint.per_sample(xt, t, model(xt, t, y), x0, x1)
        return LossOutput(per.mean(), per.detach(), t.detach())


class PairDistillationLoss(KStepDistillationLoss):
    """One-step distillation from pairs: k = 1, so t = 0 and x0 + v(x0, 0) must be the teacher's image
    (L2, or LPIPS as Liu et al. use for their one-step student)."""

    def __init__(self, distance: str = "l2", lpips_resize: int = 224) -> None:
        super().__init__(1, distance, lpips_resize)


class ReflowLoss(nn.Module):
    """2-rectified flow (Liu et al. 2023, Sec. 2.2): rectified flow trained on the teacher's (noise, image)
    couplings instead of independent ones; t from the time sampler (uniform by default), target x1 - x0."""

    def __init__(self, time_sampler_name: str = "uniform") -> None:
        super().__init__()
        self.sample_t = time_sampler(time_sampler_name)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x0, x1, y = batch["x0"], batch["x1"], batch["y"]
        t = self.sample_t(x1.shape[0], device=x1.device)
        per = _mse(model(interpolate(x0, x1, t), t, y), velocity_target(x0, x1))
        return LossOutput(per.mean(), per.detach(), t.detach())


class ProgressiveDistillationLoss(nn.Module):
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2) adapted to rectified flow and Euler steps.

    With the teacher sampling in N Euler steps of size 1/N, the student (N/2 steps) starts at a point t of its
    own grid {0, 2/N, ...}, x_t = t x1 + (1 - t) x0 from data, and must reach in one step of 2/N the point the
    teacher reaches in two: target velocity (x_{t+2/N}^teacher - x_t) / (2/N) = (v(x_t, t) + v(x', t + 1/N)) / 2.
    Uniform weighting (the velocity parametrisation needs no SNR truncation). The frozen teacher samples with
    CFG scale ``guidance``; the student learns the guided velocity directly.
    """

    def __init__(self, teacher: nn.Module, teacher_steps: int, guidance: float = 1.0) -> None:
        super().__init__()
        if teacher_steps < 2 or teacher_steps % 2:
            raise ConfigError(f"progressive distillation halves an even step count, got {teacher_steps}; "
                              "pass --options-progressive-start as a power of two (e.g. 32)")
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_steps = teacher_steps
        self.guidance = guidance

    def train(self, mode: bool = True) -> ProgressiveDistillationLoss:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x1, y = batch["x1"], batch["y"]
        x0 = torch.randn_like(x1)
        n_student = self.teacher_steps // 2
        t = torch.randint(0, n_student, (x1.shape[0],), device=x1.device).to(x1.dtype) / n_student
        dt = 1.0 / self.teacher_steps
        xt = interpolate(x0, x1, t)
        with torch.no_grad():
            v1 = guided_velocity(self.teacher, xt, t, y, self.guidance)
            v2 = guided_velocity(self.teacher, xt + dt * v1, t + dt, y, self.guidance)
            target = 0.5 * (v1 + v2)  # (B, 3, H, W)
        per = _mse(model(xt, t, y), target)
        return LossOutput(per.mean(), per.detach(), t.detach())
