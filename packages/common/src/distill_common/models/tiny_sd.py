"""A tiny, randomly initialised Stable Diffusion 1.5-architecture pipeline for tests and smoke runs.

The block structure is SD 1.5's (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"): a UNet with CrossAttnDownBlock2D x3 + DownBlock2D, a UNetMidBlock2DCrossAttn, UpBlock2D +
CrossAttnUpBlock2D x3, two layers per block; a KL autoencoder with 4 latent channels and scaling factor 0.18215;
a CLIP text transformer with the real 49,408-token vocabulary and 77 positions; the real CLIP tokenizer; and
SD 1.5's PNDM scheduler configuration. Only the widths are tiny.

VAE downsampling factor: ``2 ** (len(vae_block_out_channels) - 1)``. The default 3 VAE blocks give a factor of 4
(SD 1.5 uses 4 blocks, factor 8), so the default latent ``sample_size=16`` decodes to 64x64 images and a 2-step
64x64 generation takes well under a second on a CPU. Pass four VAE widths for SD's factor 8.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill_common.models.tokenizer import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    clip_tokenizer,
    distill_cache_dir,
)

SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SD15_MID_BLOCK = "UNetMidBlock2DCrossAttn"
# SD 1.5's unet/config.json (every field but the bookkeeping ones): parameter, MAC and timing checks without
# weights build the real architecture from it. norm_num_groups matters: width scaling rounds to its multiples.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": list(SD15_DOWN_BLOCKS),
    "mid_block_type": SD15_MID_BLOCK,
    "up_block_types": list(SD15_UP_BLOCKS),
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD_VAE_SCALING_FACTOR = 0.18215
# SD 1.5's scheduler/scheduler_config.json (PNDM with PLMS steps only).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def sd15_scheduler():
    """SD 1.5's PNDM scheduler, its config carrying ``clip_sample: false`` as SD 1.5's ``scheduler_config.json``
    does: PNDM ignores it, but ``DDIMScheduler.from_config(pipe.scheduler.config)`` (a usual swap) would otherwise
    default to clipping the predicted x0 to [-1, 1], which is wrong for latents."""
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "clip_sample": False})


@dataclass(frozen=True)
class TinySDSpec:
    """Sizes of the tiny pipeline. ``sample_size`` is the latent side; images are ``sample_size * vae_scale_factor``."""

    seed: int = 0
    sample_size: int = 16
    cross_attention_dim: int = 32
    block_out_channels: tuple[int, ...] = (32, 32, 64, 64)
    layers_per_block: int = 2
    attention_head_dim: int = 2  # diffusers' name; for SD 1.x UNets it is the number of heads
    norm_num_groups: int = 8
    vae_block_out_channels: tuple[int, ...] = (32, 32, 64)
    vae_layers_per_block: int = 1
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 64
    time_cond_proj_dim: int | None = None  # set for guidance-embedded (LCM-style) students
    unet_extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    def fingerprint(self) -> str:
        """A short hash of the spec, used as the folder name of a cached build."""
        payload = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# Random weights at SD 1.5's sizes (UNet 860M, VAE 84M with factor 8, CLIP ViT-L/14 text encoder 123M): 512 px
# images, 64x64 latents. For GPU checks and benchmarks at real size without the hub.
SD15_SIZED_SPEC = TinySDSpec(
    sample_size=64,
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    norm_num_groups=32,
    vae_block_out_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    text_layers=12,
    text_heads=12,
    text_intermediate_size=3072,
)


def _spec(spec: TinySDSpec | None, **overrides: Any) -> TinySDSpec:
    base = spec or TinySDSpec()
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    return TinySDSpec(**{**asdict(base), **overrides}) if overrides else base


def build_tiny_unet(spec: TinySDSpec):
    """A randomly initialised UNet2DConditionModel with SD 1.5's block types and tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(spec.seed)
    return UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=SD15_DOWN_BLOCKS,
        mid_block_type=SD15_MID_BLOCK,
        up_block_types=SD15_UP_BLOCKS,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
        time_cond_proj_dim=spec.time_cond_proj_dim,
        **dict(spec.unet_extra),
    )


def build_tiny_vae(spec: TinySDSpec):
    """A randomly initialised 4-channel AutoencoderKL (scaling factor 0.18215), downsampling by ``spec.vae_scale_factor``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(spec.seed + 1)
    n = len(spec.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.vae_block_out_channels),
        layers_per_block=spec.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.image_size,
        scaling_factor=SD_VAE_SCALING_FACTOR,
    )


def build_tiny_text_encoder(spec: TinySDSpec):
    """A randomly initialised CLIPTextModel with CLIP's vocabulary (49,408) and 77 positions, hidden = cross-attn dim."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(spec.seed + 2)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=spec.cross_attention_dim,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=spec.cross_attention_dim,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
    )
    return CLIPTextModel(config).eval()


def build_tiny_sd(
    out_dir: str | os.PathLike | None = None,
    *,
    spec: TinySDSpec | None = None,
    seed: int | None = None,
    sample_size: int | None = None,
    cross_attention_dim: int | None = None,
    block_out_channels: Sequence[int] | None = None,
    layers_per_block: int | None = None,
    attention_head_dim: int | None = None,
    vae_block_out_channels: Sequence[int] | None = None,
    time_cond_proj_dim: int | None = None,
    tokenizer_cache_dir: str | os.PathLike | None = None,
):
    """Build a complete, consistent, randomly initialised SD 1.5-architecture ``StableDiffusionPipeline`` (CPU, fp32).

    Keyword sizes override ``spec`` (default :class:`TinySDSpec`). With ``out_dir`` the pipeline is also saved there
    as a diffusers folder (see :func:`save_tiny_sd`). The same spec and seed always give the same weights.
    """
    from diffusers import StableDiffusionPipeline

    spec = _spec(
        spec,
        seed=seed,
        sample_size=sample_size,
        cross_attention_dim=cross_attention_dim,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim,
        vae_block_out_channels=vae_block_out_channels,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    pipe = StableDiffusionPipeline(
        vae=build_tiny_vae(spec),
        text_encoder=build_tiny_text_encoder(spec),
        tokenizer=clip_tokenizer(tokenizer_cache_dir),
        unet=build_tiny_unet(spec),
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if out_dir is not None:
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return pipe


def save_tiny_sd(path: str | os.PathLike, *, spec: TinySDSpec | None = None, **sizes: Any) -> Path:
    """Build the tiny pipeline and write it as a diffusers folder (safetensors) loadable by
    ``StableDiffusionPipeline.from_pretrained(path)`` and :func:`distill_common.models.load_sd_components`."""
    path = Path(path)
    build_tiny_sd(path, spec=spec, **sizes)
    return path


def tiny_sd_folder(cache_root: str | os.PathLike | None = None, *, spec: TinySDSpec | None = None) -> Path:
    """The tiny pipeline's diffusers folder under ``cache_root`` (default ``<distill cache>/tiny_sd``), built on first
    use and reused after: one folder per spec fingerprint, published by an atomic rename so parallel workers agree."""
    spec = spec or TinySDSpec()
    root = Path(cache_root) if cache_root is not None else distill_cache_dir() / "tiny_sd"
    target = root / f"tiny-sd-{spec.fingerprint()}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        save_tiny_sd(staging, spec=spec)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost the race to a worker whose build is complete
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
