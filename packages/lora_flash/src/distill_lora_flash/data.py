"""Training data: a Hugging Face data set, a local captioned folder, COCO 2017 captions (the default), or streamed
WebDataset caption shards (``--data-shards``, :class:`distill_common.data.shards.CaptionShardStream`).

Shuffling and augmentation (random crop, flip) depend only on (seed, epoch, index) and never touch the global
RNG, so a run resumed from a checkpoint sees exactly the batches, crops and noise of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from distill_common.data.captioned import CaptionedImageDataset, captioned_cifar10, load_captioned
from distill_lora_flash.config import TrainConfig


def training_dataset(cfg: TrainConfig) -> SeededAugmentation:
    """The captioned images ``cfg`` names, resized/cropped to ``cfg.resolution`` in [-1, 1], optionally flipped."""
    return SeededAugmentation(_captioned(cfg), cfg.seed)


def training_stream(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> Any:
    """The ``--data-shards`` stream of process ``rank`` (shards split by rank; resumable position)."""
    from distill_common.data.shards import CaptionShardStream

    return CaptionShardStream(cfg.data_shards, resolution=cfg.resolution, center_crop=cfg.center_crop,
                              random_flip=cfg.random_flip, seed=cfg.seed, rank=rank, world_size=world_size,
                              caption_key=cfg.caption_column)


def _captioned(cfg: TrainConfig) -> CaptionedImageDataset:
    common: dict[str, Any] = dict(resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                                  seed=cfg.seed, limit=cfg.max_train_samples, caption_column=cfg.caption_column)
    if cfg.dataset_name:
        return load_captioned("hub", hub_name=cfg.dataset_name, split=cfg.dataset_split,
                              image_column=cfg.image_column, **common)
    if cfg.data_dir is not None:
        return load_captioned("folder", root=cfg.data_dir, split=cfg.dataset_split, **common)
    if cfg.data_source == "cifar10":
        return captioned_cifar10(cfg.data_root, random_flip=cfg.random_flip, seed=cfg.seed,
                                 limit=cfg.max_train_samples)
    return load_captioned("coco", root=cfg.data_root, split=cfg.coco_split, **common)


class SeededAugmentation(Dataset):
    """Wraps a data set so sample ``i`` of epoch ``e`` is drawn under its own torch seed (seed, e, i)."""

    def __init__(self, dataset: CaptionedImageDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)) % (2**63 - 1))
            return self.dataset[index]

    def stats(self) -> dict[str, int]:
        return self.dataset.stats()


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``seed`` and the epoch alone (no global RNG is consumed)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def collate_captioned(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, R, R) in [-1, 1]
        "caption": [s["caption"] for s in samples],
        "image_id": [s["image_id"] for s in samples],
    }
