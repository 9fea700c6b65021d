"""Teacher-side encoders: CLIP text embeddings of prompts and the VAE's latent distribution of images.

Latents are kept as the VAE's Gaussian *moments* (mean and log-variance, ``(B, 2*4, h, w)``) and sampled per
training step with a seeded generator, so cached and freshly encoded images give the very same latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP last hidden states (B, 77, D) of ``prompts`` (padded to the tokenizer's max length, as SD
    does)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def latent_moments(vae: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's posterior parameters (B, 2C, h, w) for images in [-1, 1] (B, 3, H, W)."""
    param = next(vae.parameters())
    return vae.encode(pixel_values.to(param.device, param.dtype)).latent_dist.parameters


def sample_latents(
    moments: torch.Tensor,
    scaling_factor: float,
    generator: torch.Generator | None = None,
    shift_factor: float | None = None,
) -> torch.Tensor:
    """Scaled latents (B, C, h, w) drawn from the VAE posterior ``moments``."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(moments.float()).sample(generator=generator)
    if shift_factor:
        latents = latents - shift_factor
    return latents * scaling_factor
