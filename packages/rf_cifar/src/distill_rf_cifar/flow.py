"""Rectified flow (Liu, Gong & Liu, "Flow Straight and Fast", ICLR 2023), in the minRF style.

Convention used everywhere in this package (stated once, here):

    x_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I) noise,  x1 data,  t in [0, 1]
    velocity target  v = x1 - x0,   sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (image).

Time samplers for training (``uniform`` or ``logit_normal``: t = sigmoid(n), n ~ N(0, 1), Esser et al. 2024)
are a registry of named functions. Classifier-free guidance (Ho & Salimans 2022) is one batched forward over
(null labels, labels): v = v_u + w (v_c - v_u); w = 1 is the plain conditional model (one forward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distill_common.errors import unknown_choice

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, C, H, W), t (B,)) -> v (B, C, H, W)


def sample_uniform(n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U[0, 1]."""
    return torch.rand(n, device=device, generator=generator)


def sample_logit_normal(n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """t = sigmoid(n), n ~ N(0, 1): more weight on the middle of the path (SD3, minRF)."""
    return torch.sigmoid(torch.randn(n, device=device, generator=generator))


TIME_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"uniform": sample_uniform, "logit_normal": sample_logit_normal}


def time_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in TIME_SAMPLERS:
        raise unknown_choice("time sampler", name, TIME_SAMPLERS)
    return TIME_SAMPLERS[name]


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x1 + (1 - t) x0 for per-sample t (B,)."""
    t4 = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return t4 * x1 + (1 - t4) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def drop_labels(y: torch.Tensor, null_class: int, p: float) -> torch.Tensor:
    """Replace each label by the null class with probability p (CFG training)."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if not hasattr(model, "null_class") and hasattr(model, "module") else model  # DDP


def is_guidance_conditioned(model: nn.Module) -> bool:
    """Whether the network takes the CFG scale as an input (Meng et al. 2023 stage one: one forward per guided step)."""
    return bool(getattr(_unwrapped(model), "guidance_conditioned", False))


def nfe_per_call(model: nn.Module, guidance: float = 1.0) -> int:
    """Network evaluations per image of one :func:`guided_velocity` call: a CFG step evaluates the network on the
    unconditional and the conditional input (2 NFE, even as one doubled batch); w = 1, an unconditional model or a
    guidance-conditioned student evaluate it once."""
    m = _unwrapped(model)
    if is_guidance_conditioned(m) or float(guidance) == 1.0 or m.null_class == 0:
        return 1
    return 2


def guided_velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                    guidance: float | torch.Tensor = 1.0) -> torch.Tensor:
    """v = v_u + w (v_c - v_u) in one forward over the doubled batch; w = 1 (or an unconditional model) is one plain
    forward, and a guidance-conditioned model gets w as an input (one forward). ``guidance``: a float or (B,)."""
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    null_class = _unwrapped(model).null_class
    if is_guidance_conditioned(model):
        w = torch.as_tensor(guidance, device=x.device, dtype=torch.float32)
        return model(x, t, y, w.expand(x.shape[0]) if w.dim() == 0 else w)
    if (not torch.is_tensor(guidance) and guidance == 1.0) or null_class == 0:
        return model(x, t, y)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.full_like(y, null_class), y]))
    v_u, v_c = v.to(x.dtype).chunk(2)  # combine in the state's dtype, not autocast's
    w = guidance.view(-1, *([1] * (x.dim() - 1))).to(v_c.dtype) if torch.is_tensor(guidance) else guidance
    return v_u + w * (v_c - v_u)


def model_fn(model: nn.Module, y: torch.Tensor, guidance: float = 1.0) -> ModelFn:
    """Bind labels and guidance: the ``model_fn(x, t)`` the samplers integrate."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return guided_velocity(model, x, t.expand(x.shape[0]) if t.dim() == 0 else t, y, guidance).to(x.dtype)

    return fn


def noise_for_seeds(seeds: list[int] | tuple[int, ...], shape: tuple[int, ...] = (3, 32, 32)) -> torch.Tensor:
    """x0 (N, *shape): image i's noise from ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so equal seeds
    give equal noise whatever the batch, device or model."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
