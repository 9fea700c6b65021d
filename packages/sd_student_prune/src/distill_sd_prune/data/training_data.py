"""The training stream: micro-batches of VAE latents and CLIP text embeddings of captioned images (COCO 2017
captions, or CIFAR-10 captioned as the reference text-to-image model was trained), from the images (encoded by
the teacher's VAE and text encoder on the fly) or from a :class:`LatentCache` built once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from distill_common.data.captioned import CIFAR10_CAPTION_RESOLUTION
from distill_common.errors import ConfigError, unknown_choice
from distill_sd_prune.data.batches import ResumableBatchSampler
from distill_sd_prune.data.encoding import encode_prompts, latent_moments, sample_latents
from distill_sd_prune.data.latent_cache import (
    CachedLatentDataset,
    LatentCache,
    build_latent_cache,
    cache_fingerprint,
)
from distill_sd_prune.training.randomness import step_generator


@dataclass
class MicroBatch:
    index: int  # this process's micro-batch counter
    latents: torch.Tensor  # (B, 4, h, w), scaled, float32
    text_embeds: torch.Tensor  # (B, 77, D)
    captions: list[str]


def load_coco_captions(data_root: str | Path | None, split: str, resolution: int, **options: Any):
    """COCO 2017 captions (pycocotools) as one sample per (image, caption) pair, images in [-1, 1]; ``options``
    as in :func:`load_training_captions`."""
    return load_training_captions("coco", data_root, split, resolution, **options)


# Training data sources: COCO 2017 captions, or CIFAR-10 train images captioned with the reference model's training
# templates (distill_common.reference_sd.captions.TRAIN_TEMPLATES), its own training data.
TRAIN_SOURCES = ("coco", "cifar10")
CIFAR_RESOLUTION = CIFAR10_CAPTION_RESOLUTION


def load_training_captions(
    source: str,
    data_root: str | Path | None,
    split: str,
    resolution: int,
    *,
    limit: int | None = None,
    center_crop: bool = True,
    random_flip: bool = False,
    seed: int = 0,
    show_progress: bool = True,
):
    """The captioned training set of ``source`` (one of :data:`TRAIN_SOURCES`), one sample per (image, caption)
    pair, images in [-1, 1]:

    - ``coco``: COCO 2017 captions (pycocotools) of ``split`` at ``resolution``;
    - ``cifar10``: CIFAR-10 train images at 32 px (``split``, ``resolution`` and ``center_crop`` do not apply)
      with the captions the reference text-to-image model was trained on (``class_captions("train")``), so
      held-out templates stay unseen.
    """
    if source == "coco":
        from distill_common.data import load_captioned

        return load_captioned(
            "coco",
            data_root,
            split=split,
            resolution=resolution,
            center_crop=center_crop,
            random_flip=random_flip,
            caption_mode="all",
            seed=seed,
            limit=limit,
            show_progress=show_progress,
        )
    if source == "cifar10":
        from distill_common.data.captioned import captioned_cifar10

        return captioned_cifar10(data_root, random_flip=random_flip, caption_mode="all", seed=seed, limit=limit,
                                 show_progress=show_progress)
    raise unknown_choice("training data source", source, TRAIN_SOURCES)


def open_or_build_cache(
    dataset: Any,
    components: Any,
    cache_root: str | Path,
    teacher_ref: str,
    split: str,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    dtype: torch.dtype,
    show_progress: bool = True,
) -> LatentCache:
    """The cache folder for this fingerprint under ``cache_root``, built on first use."""
    if random_flip:
        raise ConfigError(
            "caching latents would freeze the random flips; pass --no-data-random-flip or --no-data-cache"
        )
    fields = {
        "teacher": teacher_ref,
        "vae": {k: v for k, v in dict(components.vae.config).items() if not k.startswith("_")},
        "text_encoder": components.text_encoder.config.to_dict().get("hidden_size"),
        "text_layers": components.text_encoder.config.to_dict().get("num_hidden_layers"),
        "split": split,
        "resolution": resolution,
        "center_crop": center_crop,
        "images": [r.image_id for r in dataset.records],
        "dtype": str(dtype),
    }
    folder = Path(cache_root) / f"latents-{cache_fingerprint(fields)}"
    if not (folder / "manifest.json").is_file():
        build_latent_cache(
            dataset,
            components.vae,
            components.tokenizer,
            components.text_encoder,
            folder,
            {k: v for k, v in fields.items() if k != "images"},
            dtype=dtype,
            show_progress=show_progress,
        )
    return LatentCache.open(folder)


class TrainingStream:
    """Yields :class:`MicroBatch` es on ``device`` starting at micro-batch ``start`` (see
    ``ResumableBatchSampler``)."""

    def __init__(
        self,
        dataset: Any,
        components: Any,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        cache: LatentCache | None = None,
        num_workers: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.dataset = dataset
        self.components = components
        self.cache = cache
        self.source = CachedLatentDataset(dataset, cache) if cache is not None else dataset
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.num_workers = num_workers
        self.num_replicas = num_replicas
        self.rank = rank
        self.scaling_factor = float(components.vae.config.scaling_factor)
        self.shift_factor = getattr(components.vae.config, "shift_factor", None)
        text_dtype = next(components.text_encoder.parameters()).dtype
        if cache is not None:
            self.empty_embed = cache.empty_embeds().to(device, text_dtype)
        else:
            self.empty_embed = encode_prompts(components.tokenizer, components.text_encoder, [""])[0]

    def __len__(self) -> int:
        return len(self.source)

    def iterate(self, start: int = 0) -> Iterator[MicroBatch]:
        sampler = ResumableBatchSampler(
            len(self.source), self.batch_size, self.seed, start, self.num_replicas, self.rank
        )
        loader = DataLoader(
            self.source,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.device.type == "cuda",
        )
        for m, batch in enumerate(loader, start=start):
            yield self.micro_batch(m, batch)

    def micro_batch(self, m: int, batch: dict[str, Any]) -> MicroBatch:
        """Micro-batch ``m`` from a collated batch (pixels + captions, or cached moments + text embeddings)."""
        text_dtype = next(self.components.text_encoder.parameters()).dtype
        if self.cache is not None:
            moments = batch["moments"].to(self.device, non_blocking=True)
            text = batch["text_embeds"].to(self.device, text_dtype, non_blocking=True)
        else:
            moments = latent_moments(self.components.vae, batch["pixel_values"].to(self.device))
            text = encode_prompts(
                self.components.tokenizer, self.components.text_encoder, batch["caption"]
            )
        generator = step_generator(self.seed, "latents", m, self.rank, moments.device)
        latents = sample_latents(moments, self.scaling_factor, generator, self.shift_factor)
        return MicroBatch(m, latents, text, list(batch["caption"]))


class ShardTrainingStream(TrainingStream):
    """:class:`TrainingStream` over streamed WebDataset caption shards (``--data-shards``, split by rank); the
    shard position (:meth:`state_dict`) goes into every checkpoint and :meth:`load_state_dict` resumes it."""

    def __init__(self, shards: str, components: Any, *, resolution: int, center_crop: bool, random_flip: bool,
                 batch_size: int, seed: int, device: torch.device, num_replicas: int = 1, rank: int = 0) -> None:
        from distill_common.data.shards import CaptionShardStream

        self.shards = CaptionShardStream(shards, resolution=resolution, center_crop=center_crop,
                                         random_flip=random_flip, seed=seed, rank=rank, world_size=num_replicas)
        super().__init__([], components, batch_size=batch_size, seed=seed, device=device, num_replicas=num_replicas,
                         rank=rank)

    def __len__(self) -> int:
        return 0  # endless: samples seen so far are in stats()

    def state_dict(self) -> dict[str, Any]:
        return self.shards.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shards.load_state_dict(state)

    def stats(self) -> dict[str, int]:
        return self.shards.stats()

    def iterate(self, start: int = 0) -> Iterator[MicroBatch]:
        from distill_common.data.shards import iter_batches

        for m, samples in enumerate(iter_batches(self.shards, self.batch_size), start=start):
            batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
                     "caption": [s["caption"] for s in samples]}
            yield self.micro_batch(m, batch)
