"""Training data: COCO 2017 captions, teacher VAE latents and CLIP text embeddings, optionally cached on
disk."""

from distill_sd_prune.data.batches import ResumableBatchSampler
from distill_sd_prune.data.encoding import encode_prompts, latent_moments, sample_latents
from distill_sd_prune.data.latent_cache import CachedLatentDataset, LatentCache, build_latent_cache
from distill_sd_prune.data.training_data import (
    MicroBatch,
    TrainingStream,
    load_coco_captions,
    open_or_build_cache,
)

__all__ = [
    "CachedLatentDataset",
    "LatentCache",
    "MicroBatch",
    "ResumableBatchSampler",
    "TrainingStream",
    "build_latent_cache",
    "encode_prompts",
    "latent_moments",
    "load_coco_captions",
    "open_or_build_cache",
    "sample_latents",
]
