"""Losses as small classes with one call, ``loss(model, batch) -> LossOutput`` (the EDM pattern), so one training
loop serves the teacher and every student. Conventions of flow.py: x_t = t x1 + (1 - t) x0, target x1 - x0.

Batches: images ``{"x1": (B, 3, 32, 32) in [-1, 1], "y": (B,)}``; pairs ``{"x0": noise, "x1": teacher image, "y"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    The teacher samples on the grid ``teacher_steps`` (N Euler steps: uniform ``i/N`` for an int N, else the grid's
    points themselves); the
    student samples on :func:`~distill_rf_cifar.samplers.halve_grid` of it. The student starts at a point a of its
    own grid, x_a = a x1 + (1 - a) x0 from data, and must reach in one step to its next point c what the teacher
    reaches in the (two, or for an odd N's last step one) Euler steps between them: target velocity
    (x_c^teacher - x_a) / (c - a), i.e. (v(x_a, a) + v(x_b, b)) / 2 on a uniform grid. Uniform weighting (the
    velocity parametrisation needs no SNR truncation). The frozen teacher samples with CFG scale ``guidance``;
    the student learns the guided velocity directly.
    """

    def __init__(self, teacher: nn.Module, teacher_steps: int | Sequence[float], guidance: float = 1.0) -> None:
        super().__init__()
        from distill_rf_cifar.samplers import halve_grid

        n = teacher_steps
        grid = [i / n for i in range(n + 1)] if isinstance(n, int) else [float(u) for u in n]
        if len(grid) < 3:
            raise ConfigError(f"progressive distillation halves a teacher of at least 2 steps, got {len(grid) - 1}; "
                              "pass a larger --options-progressive-start")
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_grid = torch.tensor(grid, dtype=torch.float64)
        self.student_grid = torch.tensor(halve_grid(grid), dtype=torch.float64)
        self.teacher_steps = len(grid) - 1
        self.guidance = guidance

    def train(self, mode: bool = True) -> ProgressiveDistillationLoss:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def target(self, xa: torch.Tensor, i: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The velocity that takes x_a at student grid point i (B,) to the teacher's point at student point i + 1."""
        a = self.student_grid[i]
        c = self.student_grid[i + 1]
        j = torch.searchsorted(self.teacher_grid, a)  # a's index on the teacher grid
        b = self.teacher_grid[torch.clamp(j + 1, max=len(self.teacher_grid) - 1)]  # teacher's midpoint (== c if single)
        shape = (-1, *([1] * (xa.dim() - 1)))
        dtype = xa.dtype
        a_, b_, c_ = (v.to(xa.device, dtype) for v in (a, b, c))
        v1 = guided_velocity(self.teacher, xa, a_, y, self.guidance)
        xb = xa + (b_ - a_).view(shape) * v1
        double = (b_ < c_).view(shape)  # two teacher steps, else the odd grid's last single step
        v2 = guided_velocity(self.teacher, xb, b_, y, self.guidance)
        xc = torch.where(double, xb + (c_ - b_).view(shape) * v2, xb)
        return (xc - xa) / (c_ - a_).view(shape)  # (B, 3, H, W)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x1, y = batch["x1"], batch["y"]
        x0 = torch.randn_like(x1)
        i = torch.randint(0, len(self.student_grid) - 1, (x1.shape[0],))
        t = self.student_grid[i].to(x1.device, x1.dtype)
        xt = interpolate(x0, x1, t)
        target = self.target(xt, i, y)
        per = _mse(model(xt, t, y), target)
        return LossOutput(per.mean(), per.detach(), t.detach())


# ------------------------------------------------------------------------------------------------------------------
# Guidance-conditioned distillation and score distillation sampling (issue 12, items 3 and 4).
# ------------------------------------------------------------------------------------------------------------------


class GuidanceConditionedLoss(nn.Module):
    """Guided distillation, stage one (Meng et al. 2023, "On Distillation of Guided Diffusion Models", Eq. 6).

    A student v_s(x, t, y, w) that takes the CFG scale w as an input learns the teacher's guided velocity
    v_u + w (v_c - v_u) in one forward, for w ~ U[w_min, w_max] per sample, x_t = t x1 + (1 - t) x0 from data and
    fresh noise, t from the time sampler. Sampling it with scale w then costs one network call per step, not two.
    """

    def __init__(self, teacher: nn.Module, w_min: float = 1.0, w_max: float = 8.0,
                 time_sampler_name: str = "logit_normal") -> None:
        super().__init__()
        if not 0.0 <= w_min <= w_max:
            raise ConfigError(f"guidance range [{w_min}, {w_max}] is empty or negative; pass 0 <= "
                              "--options-guidance-min <= --options-guidance-max (e.g. 1 and 8)")
        if getattr(teacher, "guidance_conditioned", False):
            raise ConfigError("the teacher already takes w as an input; distil from a CFG teacher (a plain rf generator)")
        self.teacher = teacher.eval().requires_grad_(False)
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.sample_t = time_sampler(time_sampler_name)

    def train(self, mode: bool = True) -> GuidanceConditionedLoss:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def target(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The CFG teacher's output v_u + w (v_c - v_u) for per-sample w (B,): one forward over the doubled batch."""
        return guided_velocity(self.teacher, xt, t, y, w)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        x1, y = batch["x1"], batch["y"]
        x0 = torch.randn_like(x1)
        t = self.sample_t(x1.shape[0], device=x1.device)
        w = self.w_min + (self.w_max - self.w_min) * torch.rand(x1.shape[0], device=x1.device)  # (B,)
        xt = interpolate(x0, x1, t)
        per = _mse(model(xt, t, y, w), self.target(xt, t, y, w))
        return LossOutput(per.mean(), per.detach(), t.detach())


def epsilon_from_velocity(xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The noise a velocity implies: x_t = t x1 + (1 - t) x0 and v = x1 - x0 give x_t = x0 + t v, so
    eps_hat = x0_hat = x_t - t v (the flow's epsilon-prediction; t (B,) or a scalar)."""
    t4 = torch.as_tensor(t, device=xt.device, dtype=xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
    return xt - t4 * v


SDS_WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "uniform": lambda t: torch.ones_like(t),  # w(t) = 1
    "noise_variance": lambda t: (1 - t) ** 2,  # w(t) = sigma_t^2, DreamFusion's choice, with sigma_t = 1 - t here
}


class ScoreDistillation(nn.Module):
    """Score distillation sampling (Poole et al. 2022, "DreamFusion", Eq. 3) with a flow teacher.

    For an image x (any parametrisation x = g(theta)), t ~ U[t_min, t_max] (away from the ends, where the
    teacher's epsilon is degenerate) and eps ~ N(0, I): x_t = t x + (1 - t) eps, eps_hat = x_t - t v_cfg(x_t, t, y)
    (:func:`epsilon_from_velocity`), and grad_x = w(t) (eps_hat - eps), the teacher's Jacobian skipped. Calling the
    module returns the surrogate sum(grad.detach() * x), whose gradient with respect to x is exactly that.
    """

    def __init__(self, teacher: nn.Module, guidance: float = 100.0, t_min: float = 0.02, t_max: float = 0.98,
                 weighting: str = "uniform") -> None:
        super().__init__()
        if not 0.0 < t_min < t_max < 1.0:
            raise ConfigError(f"SDS draws t in (t_min, t_max) strictly inside (0, 1), got [{t_min}, {t_max}]; "
                              "pass e.g. --t-min 0.02 --t-max 0.98")
        if weighting not in SDS_WEIGHTINGS:
            raise unknown_choice("SDS weighting", weighting, SDS_WEIGHTINGS)
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance, self.t_min, self.t_max = float(guidance), float(t_min), float(t_max)
        self.weight = SDS_WEIGHTINGS[weighting]

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.t_min + (self.t_max - self.t_min) * torch.rand(n, device=device)

    @torch.no_grad()
    def gradient(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """w(t) (eps_hat - eps) for images x (B, 3, H, W) at times t (B,) with noise eps (B, 3, H, W)."""
        xt = interpolate(eps, x, t)  # x is the data end (t = 1), eps the noise end
        v = guided_velocity(self.teacher, xt, t, y, self.guidance)
        return self.weight(t).view(-1, 1, 1, 1).to(x.dtype) * (epsilon_from_velocity(xt, t, v) - eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        t = self.sample_t(x.shape[0], device=x.device)
        grad = self.gradient(x.detach(), y, t, torch.randn_like(x))
        surrogate = (grad * x).flatten(1).sum(1)  # d/dx = grad
        return LossOutput(surrogate.sum(), grad.square().mean(dim=(1, 2, 3)), t)
