"""A tiny, randomly initialised SDXL-architecture pipeline (Podell et al. 2023, "SDXL: Improving Latent Diffusion
Models for High-Resolution Image Synthesis") for tests and smoke runs, and the schedulers of SD-Turbo / SDXL-Turbo
(Sauer et al. 2023, "Adversarial Diffusion Distillation").

The structure is SDXL's: a UNet with DownBlock2D + CrossAttnDownBlock2D x2 (and the mirrored up blocks), linear
transformer projections, micro-conditioning through ``addition_embed_type='text_time'`` (the pooled text embedding of
the second text encoder + six size/crop numbers, each sinusoidally embedded); two CLIP text encoders whose
penultimate hidden states are concatenated (``cross_attention_dim`` = the sum of their widths), the second a
``CLIPTextModelWithProjection``; both with the real CLIP BPE tokenizer (the second padding with ``!`` as SDXL's
OpenCLIP tokenizer does); a 4-channel KL autoencoder with SDXL's scaling factor 0.13025. Only the widths are tiny.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill_common.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer

SDXL_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SDXL_VAE_SCALING_FACTOR = 0.13025
SDXL_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)
_TURBO_BETAS: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
                                "timestep_spacing": "trailing"}
# scheduler/scheduler_config.json of stabilityai/sd-turbo (Euler) and stabilityai/sdxl-turbo (Euler ancestral):
# SD's betas, "trailing" spacing so that one step starts at t = 999.
SD_TURBO_SCHEDULER = ("EulerDiscreteScheduler", _TURBO_BETAS)
SDXL_TURBO_SCHEDULER = ("EulerAncestralDiscreteScheduler", _TURBO_BETAS)


def turbo_scheduler(kind: str = "sd"):
    """A fresh scheduler as SD-Turbo (``kind='sd'``) or SDXL-Turbo (``'sdxl'``) ship it."""
    import diffusers

    name, config = SDXL_TURBO_SCHEDULER if kind == "sdxl" else SD_TURBO_SCHEDULER
    return getattr(diffusers, name)(**config)


@dataclass(frozen=True)
class TinySDXLSpec:
    """Sizes of the tiny SDXL pipeline. ``sample_size`` is the latent side; images are ``sample_size * 4`` here."""

    seed: int = 0
    sample_size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 2)
    attention_head_dim: tuple[int, ...] = (2, 4, 4)
    norm_num_groups: int = 8
    text_hidden_size: int = 32  # text_encoder (CLIP ViT-L/14's text tower in SDXL: 768)
    text2_hidden_size: int = 32  # text_encoder_2 (OpenCLIP ViT-bigG's: 1280)
    text2_projection_dim: int = 32  # pooled embedding of text_encoder_2 fed to the time embedding (SDXL: 1280)
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 64
    addition_time_embed_dim: int = 8  # SDXL: 256
    vae_block_out_channels: tuple[int, ...] = (32, 32, 64)

    @property
    def cross_attention_dim(self) -> int:
        return self.text_hidden_size + self.text2_hidden_size

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.sample_size * self.vae_scale_factor


def _text_config(spec: TinySDXLSpec, hidden: int, projection: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        max_position_embeddings=CLIP_MAX_LENGTH, hidden_act=act, projection_dim=projection,
        bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1,
    )


def build_tiny_sdxl(out_dir: str | os.PathLike | None = None, *, spec: TinySDXLSpec | None = None,
                    scheduler: Any = None):
    """A complete, randomly initialised SDXL-architecture ``StableDiffusionXLPipeline`` (CPU, fp32); saved to
    ``out_dir`` as a diffusers folder when given. ``scheduler`` defaults to SDXL-Turbo's (Euler ancestral, trailing)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = spec or TinySDXLSpec()
    torch.manual_seed(spec.seed)
    unet = UNet2DConditionModel(
        sample_size=spec.sample_size, in_channels=4, out_channels=4,
        down_block_types=SDXL_DOWN_BLOCKS, up_block_types=SDXL_UP_BLOCKS,
        block_out_channels=tuple(spec.block_out_channels), layers_per_block=spec.layers_per_block,
        transformer_layers_per_block=tuple(spec.transformer_layers_per_block),
        attention_head_dim=tuple(spec.attention_head_dim), use_linear_projection=True,
        cross_attention_dim=spec.cross_attention_dim, norm_num_groups=spec.norm_num_groups,
        addition_embed_type="text_time", addition_time_embed_dim=spec.addition_time_embed_dim,
        projection_class_embeddings_input_dim=spec.text2_projection_dim + SDXL_TIME_IDS * spec.addition_time_embed_dim,
    )
    torch.manual_seed(spec.seed + 1)
    n = len(spec.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(spec.vae_block_out_channels),
        layers_per_block=1, latent_channels=4, norm_num_groups=spec.norm_num_groups, sample_size=spec.image_size,
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
    )
    torch.manual_seed(spec.seed + 2)
    text_encoder = CLIPTextModel(_text_config(spec, spec.text_hidden_size, spec.text_hidden_size, "quick_gelu")).eval()
    torch.manual_seed(spec.seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(spec, spec.text2_hidden_size, spec.text2_projection_dim, "gelu")).eval()
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second (OpenCLIP) tokenizer pads with "!" (id 0), not <|endoftext|>
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler if scheduler is not None else turbo_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    if out_dir is not None:
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return pipe


def save_tiny_sdxl(path: str | os.PathLike, *, spec: TinySDXLSpec | None = None, scheduler: Any = None) -> Path:
    """Build the tiny SDXL pipeline and write it as a diffusers folder, loadable by ``AutoPipelineForText2Image``."""
    path = Path(path)
    build_tiny_sdxl(path, spec=spec, scheduler=scheduler)
    return path
