"""The reference text-to-image model's architecture: Stable Diffusion 1.5's classes and block types, CIFAR-sized.

Every component is the real class that SD 1.5 uses (Rombach et al. 2022): ``AutoencoderKL`` (4 latent channels,
scaling factor 0.18215), ``UNet2DConditionModel`` (CrossAttnDownBlock2D x3 + DownBlock2D, a cross-attention mid
block, UpBlock2D + CrossAttnUpBlock2D x3), a ``CLIPTextModel`` with CLIP's 49,408-token BPE vocabulary and 77
positions, the real CLIP tokenizer, and SD 1.5's scaled-linear, epsilon-prediction noise schedule. Only the widths
are small: 32x32 RGB images, a VAE that downsamples by 2 to 16x16x4 latents.
"""

from __future__ import annotations

from distill_common.models.tiny_sd import TinySDSpec

# 32 px images (CIFAR-10), 16x16x4 latents: two VAE levels (factor 2).
REFERENCE_SD_SPEC = TinySDSpec(
    seed=0,
    sample_size=16,
    cross_attention_dim=64,
    block_out_channels=(64, 96, 128, 128),
    layers_per_block=1,
    attention_head_dim=2,  # heads per attention layer (diffusers' SD 1.x naming)
    norm_num_groups=32,
    vae_block_out_channels=(32, 64),
    vae_layers_per_block=1,
    text_layers=2,
    text_heads=4,
    text_intermediate_size=256,
)
