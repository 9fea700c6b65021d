"""Latent consistency distillation into a LoRA: LCM-LoRA (Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference" and "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module"),
on the consistency models of Song et al. 2023 ("Consistency Models").

One training step, for latents ``z0`` and caption conditioning ``c``:

1. **Skipping-step grid.** The teacher's DDIM solver (Song et al. 2021) runs on ``N = T // k`` timesteps
   ``t_n = (n + 1) k - 1`` (k = 20, T = 1000: the 50-point grid ``19, 39, ..., 999`` that LCMScheduler's
   ``original_inference_steps=50`` samples from). Draw ``n`` uniformly, ``t = t_n``, ``s = max(t - k, 0)``.
2. **Noise.** ``x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``.
3. **Teacher** (the base UNet: the student's UNet with its adapters off) with classifier-free guidance at
   ``w ~ U[w_min, w_max]`` per sample (fixed when ``w_min == w_max``), applied to both the x0 and the eps
   prediction, then one DDIM step to ``x_s = sqrt(abar_s) x0_w + sqrt(1 - abar_s) eps_w`` (LCM eq. 8-9).
   ``w`` is in this project's CFG convention ``eps_u + w (eps_c - eps_u)``, i.e. diffusers' script's ``w + 1``.
4. **Consistency function** with the boundary condition ``f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)``,
   ``c_skip = sigma_d^2 / ((t / 0.1)^2 + sigma_d^2)``, ``c_out = (t / 0.1) / sqrt((t / 0.1)^2 + sigma_d^2)``,
   ``sigma_d = 0.5`` (LCM's choice; diffusers' ``timestep_scaling = 10``): ``f(x, 0) = x``.
5. **Target.** ``f_target = f(x_s, s)`` by **the LoRA student itself under no_grad**. LCM uses an EMA copy of the
   student as its target network; a LoRA has no EMA copy here, so, as in LCM-LoRA and diffusers'
   ``train_lcm_distill_lora_sd_wds.py``, the current student (stop-gradient) is its own target.
6. **Loss.** Pseudo-Huber ``sqrt((f - f_target)^2 + c^2) - c`` (Song & Dhariwal 2023, "Improved Techniques for
   Training Consistency Models"; c = 0.001 as in diffusers' script), averaged, or plain L2.

The student is conditioned on the caption only (no guidance embedding): it samples at guidance 0 with
LCMScheduler, exactly as the noise-matching student does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distill_common.errors import ConfigError, TrainingDivergedError
from distill_lora_flash.conditioning import Conditioning, unet_forward
from distill_lora_flash.losses import CFGTeacher

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # t / 0.1
LCM_LOSSES = ("huber", "l2")


def boundary_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` (B,) of the consistency boundary condition at integer timesteps ``t`` (B,)."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def predicted_x0_and_eps(model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                         prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` from a UNet output; ``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)`` broadcast to x_t."""
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - sigma * eps) / alpha, eps
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
    raise ConfigError(f"unknown prediction type {prediction_type!r}; valid choices: epsilon, v_prediction")


class SkippingDDIMSolver:
    """The teacher's DDIM solver on the skipping-step grid ``t_n = (n + 1) k - 1``, n = 0..N-1, N = T // k."""

    def __init__(self, alphas_cumprod: torch.Tensor, skip: int = 20) -> None:
        num_train = int(alphas_cumprod.shape[0])
        if not 1 <= skip <= num_train // 2:
            raise ConfigError(f"--lcm-skip must be in [1, {num_train // 2}] for {num_train} training timesteps, got {skip}")
        self.skip = int(skip)
        self.alphas_cumprod = alphas_cumprod.float()
        n = num_train // self.skip
        self.timesteps = (torch.arange(1, n + 1) * self.skip - 1).long()  # (N,): 19, 39, ..., 999 for k = 20

    def draw(self, batch: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, s)`` (B,) each: t uniform on the grid, ``s = max(t - k, 0)`` (the global torch RNG: resumable)."""
        index = torch.randint(0, len(self.timesteps), (batch,))
        t = self.timesteps[index]
        return t.to(device), (t - self.skip).clamp(min=0).to(device)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t]
        return _bcast(abar.sqrt(), like), _bcast((1 - abar).sqrt(), like)

    def step(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """DDIM (eta = 0) to timestep ``s``: ``sqrt(abar_s) x0 + sqrt(1 - abar_s) eps``."""
        alpha_s, sigma_s = self.coefficients(s, x0)
        return alpha_s * x0 + sigma_s * eps


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample ``mean(sqrt((a - b)^2 + c^2) - c)`` (B,)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).flatten(1).mean(dim=1)


class LCMMethod:
    """``--method lcm``: ``method(unet, latents, cond, uncond) -> (loss, logs)``, one consistency-distillation step."""

    name = "lcm"

    def __init__(self, alphas_cumprod: torch.Tensor, *, skip: int = 20, guidance_min: float = 4.0,
                 guidance_max: float = 16.0, loss: str = "huber", huber_c: float = 1e-3,
                 prediction_type: str = "epsilon") -> None:
        if loss not in LCM_LOSSES:
            raise ConfigError(f"--lcm-loss must be one of {', '.join(LCM_LOSSES)}, got {loss!r}")
        if not 0 <= guidance_min <= guidance_max:
            raise ConfigError(f"need 0 <= --lcm-guidance-min <= --lcm-guidance-max, got {guidance_min}, {guidance_max}")
        self.solver = SkippingDDIMSolver(alphas_cumprod, skip)
        self.guidance_min, self.guidance_max = float(guidance_min), float(guidance_max)
        self.loss, self.huber_c, self.prediction_type = loss, float(huber_c), prediction_type

    def draw_guidance(self, batch: int) -> torch.Tensor:
        if self.guidance_min == self.guidance_max:
            return torch.full((batch,), self.guidance_min)
        return self.guidance_min + (self.guidance_max - self.guidance_min) * torch.rand(batch)

    def consistency(self, unet: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Conditioning) -> torch.Tensor:
        """``f(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t)`` with the UNet as it is now (adapters on)."""
        alpha, sigma = self.solver.coefficients(t, x)
        x0, _ = predicted_x0_and_eps(unet_forward(unet, x, t, cond).float(), x.float(), alpha.float(), sigma.float(),
                                     self.prediction_type)
        c_skip, c_out = boundary_scalings(t)
        return _bcast(c_skip, x0) * x.float() + _bcast(c_out, x0) * x0

    def __call__(self, unet: Any, latents: torch.Tensor, cond: torch.Tensor | Conditioning,
                 uncond: torch.Tensor | Conditioning) -> tuple[torch.Tensor, dict[str, float]]:
        bsz = latents.shape[0]
        noise = torch.randn_like(latents)  # (B, 4, h, w)
        t, s = self.solver.draw(bsz, latents.device)  # (B,) each
        w = self.draw_guidance(bsz)  # (B,)
        alpha_t, sigma_t = self.solver.coefficients(t, latents)
        x_t = alpha_t * latents + sigma_t * noise

        student = self.consistency(unet, x_t, t, cond)  # (B, 4, h, w), with gradient
        with torch.no_grad():
            teacher = CFGTeacher(unet, 1.0)
            out = teacher(x_t, t, cond, uncond, guidance=w)  # guided UNet output; linear in the output
            x0_w, eps_w = predicted_x0_and_eps(out.float(), x_t.float(), alpha_t.float(), sigma_t.float(),
                                               self.prediction_type)
            x_s = self.solver.step(x0_w, eps_w, s).to(latents.dtype)
            target = self.consistency(unet, x_s, s, cond)  # the student as its own target, no gradient

        per_sample = (pseudo_huber(student, target, self.huber_c) if self.loss == "huber"
                      else F.mse_loss(student, target.float(), reduction="none").flatten(1).mean(dim=1))
        loss = per_sample.mean()
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the consistency loss became {loss.item()} at timesteps {t.tolist()}; lower --learning-rate or "
                "use --precision fp32/bf16")
        return loss, {"lcm_loss": float(loss.detach()), "guidance": float(w.mean()), "t": float(t.float().mean())}


class WeightedMethods:
    """A recipe as a weighted sum of recipes, ``sum_i w_i loss_i``, each on its own noise and timesteps; logs are
    prefixed by the component's name (``lcm/lcm_loss``, ``noise_matching/mse``, ...).

    ``--lcm-noise-matching-weight`` composes LCM-LoRA with the noise-matching term of the CFG teacher (Flash Diffusion's
    per-timestep target, Chadebec et al. 2024): the consistency term learns the few-step trajectory, the noise-matching
    term pulls each step's prediction toward the guided teacher's, i.e. toward its prompt adherence."""

    def __init__(self, components: list[tuple[float, Any]]) -> None:
        if not components or any(w < 0 for w, _ in components):
            raise ConfigError("a weighted recipe needs at least one component and weights >= 0")
        self.components = components
        self.name = "+".join(m.name for _, m in components)

    def __call__(self, unet: Any, latents: torch.Tensor, cond: torch.Tensor | Conditioning,
                 uncond: torch.Tensor | Conditioning) -> tuple[torch.Tensor, dict[str, float]]:
        total: torch.Tensor | None = None
        logs: dict[str, float] = {}
        for weight, method in self.components:
            loss, part = method(unet, latents, cond, uncond)
            total = weight * loss if total is None else total + weight * loss
            logs[f"{method.name}/loss"] = float(loss.detach())
            logs.update({f"{method.name}/{k}": v for k, v in part.items()})
        return total, logs
