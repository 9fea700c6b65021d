"""Noise-matching distillation of a CFG teacher into a guidance-free LoRA student.

Teacher: the frozen base UNet (the student's UNet with its adapters switched off), one forward pass on the
doubled batch (uncond, cond), combined with classifier-free guidance (Ho & Salimans 2022):
``eps_cfg = eps_u + w (eps_c - eps_u)``. Student: the same UNet with the LoRA on, conditional only.
Loss: ``MSE(eps_student, eps_cfg)`` per sample, weighted by Min-SNR-gamma (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy"): ``min(SNR, gamma) / SNR`` for
epsilon-prediction, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction, ``SNR = abar / (1 - abar)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distill_common.errors import ConfigError, TrainingDivergedError
from distill_lora_flash.conditioning import Conditioning, cat_conditioning, unet_forward

PREDICTION_TYPES = ("epsilon", "v_prediction")


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor,
                             scale: float | torch.Tensor) -> torch.Tensor:
    """``eps_u + w (eps_c - eps_u)`` (Ho & Salimans 2022, eq. 6 with w = 1 + their w)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (B,), through diffusers' ``compute_snr``."""
    from types import SimpleNamespace

    from diffusers.training_utils import compute_snr

    return compute_snr(SimpleNamespace(alphas_cumprod=alphas_cumprod), timesteps)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-sample loss weights (B,); all ones when ``gamma`` is None or 0 (weighting off)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction type {prediction_type!r}; valid choices: {', '.join(PREDICTION_TYPES)}")
    if not gamma:
        return torch.ones(timesteps.shape, device=timesteps.device)
    if gamma < 0:
        raise ConfigError(f"--snr-gamma must be positive (or 0 to turn Min-SNR weighting off), got {gamma}")
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=float(gamma))
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


def _base(unet: Any) -> Any:
    """The diffusers model under DDP/compile wrappers (adapter switches live there)."""
    while hasattr(unet, "module"):
        unet = unet.module
    return getattr(unet, "_orig_mod", unet)


class CFGTeacher:
    """The frozen base UNet with classifier-free guidance: the student's UNet with its LoRA switched off."""

    def __init__(self, unet: Any, guidance: float) -> None:
        self.unet = unet
        self.guidance = float(guidance)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Conditioning,
                 uncond: torch.Tensor | Conditioning, guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, 4, h, w), t (B,), cond / uncond (B, L, D) or SDXL conditionings -> the guided prediction
        (B, 4, h, w); ``guidance`` (a float or per-sample (B,)) overrides the scale given at construction."""
        base = _base(self.unet)
        has_adapters = bool(getattr(base, "peft_config", None))
        if has_adapters:
            base.disable_adapters()
        try:
            out = unet_forward(base, torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditioning(uncond, cond))
        finally:
            if has_adapters:
                base.enable_adapters()
        eps_uncond, eps_cond = out.chunk(2)  # (B, 4, h, w) each
        scale = self.guidance if guidance is None else guidance
        if isinstance(scale, torch.Tensor):
            scale = scale.to(out).view(-1, *([1] * (out.dim() - 1)))
        return classifier_free_guidance(eps_uncond, eps_cond, scale)


class NoiseMatchingLoss:
    """``loss(unet, x_t, t, cond, uncond) -> (scalar, logs)``: Min-SNR-weighted MSE to the CFG teacher."""

    def __init__(self, alphas_cumprod: torch.Tensor, teacher_guidance: float = 7.5, snr_gamma: float | None = 5.0,
                 prediction_type: str = "epsilon") -> None:
        self.alphas_cumprod = alphas_cumprod
        self.teacher_guidance = float(teacher_guidance)
        self.snr_gamma = snr_gamma
        self.prediction_type = prediction_type

    def __call__(self, unet: Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Conditioning,
                 uncond: torch.Tensor | Conditioning) -> tuple[torch.Tensor, dict[str, float]]:
        target = CFGTeacher(unet, self.teacher_guidance)(x_t, t, cond, uncond)  # (B, 4, h, w)
        student = unet_forward(unet, x_t, t, cond)  # (B, 4, h, w)
        per_sample = F.mse_loss(student.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        weights = min_snr_weights(self.alphas_cumprod, t, self.snr_gamma, self.prediction_type).to(per_sample)
        loss = (per_sample * weights).mean()
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the distillation loss became {loss.item()} at timesteps {t.tolist()}; lower --learning-rate or "
                "use --precision fp32/bf16"
            )
        return loss, {"mse": float(per_sample.mean().detach()), "snr_weight": float(weights.mean())}


class NoiseMatchingMethod:
    """The training step of ``--method noise_matching``: draw noise and t, noise the latents, :class:`NoiseMatchingLoss`.

    ``method(unet, latents, cond, uncond) -> (loss, logs)`` is the one interface the training loop calls.
    """

    name = "noise_matching"

    def __init__(self, loss: NoiseMatchingLoss, noise_scheduler: Any, timestep_sampler: Any) -> None:
        self.loss, self.noise_scheduler, self.timestep_sampler = loss, noise_scheduler, timestep_sampler

    def __call__(self, unet: Any, latents: torch.Tensor, cond: torch.Tensor | Conditioning,
                 uncond: torch.Tensor | Conditioning) -> tuple[torch.Tensor, dict[str, float]]:
        noise = torch.randn_like(latents)  # (B, 4, h, w)
        t = self.timestep_sampler(latents.shape[0], latents.device)  # (B,)
        x_t = self.noise_scheduler.add_noise(latents, noise, t)
        return self.loss(unet, x_t, t, cond, uncond)
