"""In-memory training sets and their resumable order.

CIFAR-10 (150 MB as uint8) and the pair shards fit in memory, so a batch is a tensor index, not a DataLoader
pass. The order is a seeded permutation per epoch, so the data position is just ``(epoch, index)``: a resumed
run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from distill_common.errors import ConfigError


class TrainingData(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples at ``indices`` as a dict of CPU tensors."""
        ...


class ImageLabelData:
    """CIFAR-10 images (N, 3, 32, 32) uint8 and labels (N,) -> ``{"x1": float in [-1, 1], "y": long}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool = True) -> None:
        assert images.dtype == torch.uint8 and images.dim() == 4, "images must be uint8 (N, 3, H, W)"
        assert labels.shape[0] == images.shape[0], "one label per image"
        self.images, self.labels, self.random_flip = images, labels.long(), random_flip
        self.num_corrupt = 0  # unreadable source images skipped while loading

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.images[indices].float().div_(127.5).sub_(1.0)  # (B, 3, 32, 32) in [-1, 1]
        if self.random_flip:
            flip = torch.rand(x.shape[0]) < 0.5  # global RNG: saved and restored with the checkpoint
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return {"x1": x, "y": self.labels[indices]}


class PairData:
    """Teacher pairs: ``{"x0": noise, "x1": teacher image, "y": label}`` (float32 copies of the stored dtype)."""

    def __init__(self, noise: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
        assert noise.shape == images.shape and labels.shape[0] == noise.shape[0], "pair tensors disagree in shape"
        self.noise, self.images, self.labels = noise, images, labels.long()

    def __len__(self) -> int:
        return self.noise.shape[0]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x0": self.noise[indices].float(), "x1": self.images[indices].float(), "y": self.labels[indices]}


class PairsWithImages:
    """Teacher pairs and real CIFAR-10 images in one batch, for losses that need both (adversarial distillation):
    ``{"x0", "x1", "y"}`` from the pairs and ``{"real", "real_y"}`` from the images. An epoch covers the larger set
    once; index i takes pair ``i % len(pairs)`` and image ``i % len(images)``, so the batch depends on the loop's
    data position only and resume stays exact."""

    def __init__(self, pairs: PairData, images: ImageLabelData) -> None:
        self.pairs, self.images = pairs, images

    def __len__(self) -> int:
        return max(len(self.pairs), len(self.images))

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.pairs.batch(indices % len(self.pairs))
        real = self.images.batch(indices % len(self.images))
        return {**out, "real": real["x1"], "real_y": real["y"]}


@dataclass
class EpochOrder:
    """Batches of a seeded permutation per epoch (incomplete last batches are dropped); position = (epoch, index)."""

    size: int
    batch_size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        if self.batch_size > self.size:
            raise ConfigError(
                f"batch size {self.batch_size} exceeds the {self.size} training samples; lower --batch-size "
                f"to at most {self.size} or provide more data"
            )
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.size, generator=g), epoch
        return self._perm

    def next_indices(self) -> torch.Tensor:
        if self.index + self.batch_size > self.size:
            self.epoch, self.index = self.epoch + 1, 0
        out = self.permutation(self.epoch)[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def check_training_data(data_root: Path | str | None, source: str = "shards") -> None:
    """Fail in one line, before any stage or model load, when the configured CIFAR-10 is not there (nothing is
    read: the data root and the shard or batch files are looked up only)."""
    from distill_common.data.cifar10 import locate_cifar10
    from distill_common.data.root import resolve_data_root

    if source == "shards":
        locate_cifar10(data_root, "train")
    elif source == "folder":
        resolve_data_root(data_root)


def load_cifar_training_data(data_root: Path | str | None, source: str = "shards", limit: int | None = None,
                             random_flip: bool = True, show_progress: bool = True,
                             strict: bool = False) -> ImageLabelData:
    """CIFAR-10 train split decoded once into memory (via distill_common.data).

    Unreadable images of a folder source are skipped and counted in one printed line (``strict``: refused).
    """
    from rich.console import Console

    from distill_common.config import cli_flag
    from distill_common.data import load_cifar10, open_cifar10
    from distill_common.data.images import IMAGE_ERRORS, skipped_note, unreadable_image

    if source == "shards":
        ds = open_cifar10(data_root, "train", limit=limit, show_progress=show_progress)
        return ImageLabelData(ds.uint8_images().clone(), torch.tensor(ds.labels), random_flip)
    ds = load_cifar10(source, "train", data_root, limit=limit, strict=strict, strict_flag=cli_flag(("data", "strict")))
    bad = list(getattr(ds, "corrupt", []))
    images, labels = [], []
    for i in range(len(ds)):
        try:
            x, y = ds[i]  # (3, 32, 32) in [-1, 1]
        except IMAGE_ERRORS as err:  # passed the header check, fails at full decode (e.g. truncated)
            path = ds.samples[i][0] if hasattr(ds, "samples") else i
            if strict:
                raise unreadable_image(path, err, cli_flag(("data", "strict"))) from None
            bad.append(f"{path}: {type(err).__name__}: {err}")
            continue
        images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(int(y))
    if bad:
        Console(stderr=True).print(f"[yellow]warning:[/] {skipped_note(bad, data_root)}", highlight=False,
                                   soft_wrap=True)
    data = ImageLabelData(torch.stack(images), torch.tensor(labels), random_flip)
    data.num_corrupt = len(bad)
    return data
