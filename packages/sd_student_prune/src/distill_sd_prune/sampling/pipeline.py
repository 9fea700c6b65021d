"""Text-to-image sampling with diffusers: DDPM (Ho et al. 2020), PNDM (Liu et al. 2022), DDIM (Song et al.
2021), Euler and Euler ancestral (Karras et al. 2022) or DPM-Solver++ 2M (Lu et al. 2022) over a Stable
Diffusion pipeline whose UNet may be a student, with classifier-free guidance (Ho & Salimans 2022).

Each image has its own seed (a CPU ``torch.Generator`` per image), so the same seed gives the same initial
noise for the teacher and every student, on any device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from distill_common.errors import ConfigError, unknown_choice

SAMPLERS = {"ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "ddim": "DDIMScheduler",
            "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "dpm": "DPMSolverMultistepScheduler"}
HEADLINE_STEPS = 25  # the seed's headline setting: 25 DDPM steps, CFG 5
HEADLINE_GUIDANCE = 5.0


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh scheduler of kind ``name`` sharing the base model's noise schedule (betas, offset, spacing).

    DDPM and DDIM get ``clip_sample: false`` unless the base config sets it: SD's latents are not in [-1, 1], and
    diffusers' default (clip) would distort every sample of a model whose config omits the key."""
    import diffusers

    if name not in SAMPLERS:
        raise unknown_choice("sampler", name, SAMPLERS)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    if name in ("ddpm", "ddim"):
        config.setdefault("clip_sample", False)
    return getattr(diffusers, SAMPLERS[name]).from_config(config)


def build_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any):
    """A ``StableDiffusionPipeline`` without safety checker (it blacks out images and inflates FID)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_resolution(resolution: int, vae_scale_factor: int, unet_config: Mapping[str, Any]) -> None:
    """Refuse image sizes outside 32..1024 or not divisible by the VAE factor times the UNet's downsampling."""
    downsamples = len(unet_config["down_block_types"]) - 1
    unit = vae_scale_factor * 2**downsamples
    if not 32 <= resolution <= 1024 or resolution % unit:
        raise ConfigError(
            f"resolution {resolution} must lie in 32..1024 and be a multiple of {unit} "
            f"(VAE factor {vae_scale_factor} x 2^{downsamples} UNet downsamplings); pass e.g. --resolution 64"
        )


@torch.no_grad()
def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    guidance: float,
    resolution: int,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Images (N, 3, R, R) in [0, 1], float32 on the CPU; ``guidance <= 1`` turns classifier-free guidance
    off."""
    if len(prompts) != len(seeds):
        raise ConfigError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    device = pipe.unet.device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        context = (
            torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        )
        with context:
            result = pipe(
                prompt=chunk,
                num_inference_steps=int(num_steps),
                guidance_scale=float(guidance),
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="pt",
            )
        out.append(result.images.float().cpu().clamp(0, 1))
    return torch.cat(out)
