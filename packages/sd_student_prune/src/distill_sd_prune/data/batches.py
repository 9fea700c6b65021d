"""A resumable, process-sharded batch order: global batch b of epoch e = b // (N // B) is the slice ``[(b mod
per_epoch) * B, ...)`` of a permutation seeded by (seed, e); process r of R takes global batches ``m * R + r``
for its micro-batches m = 0, 1, … A resumed run starts at its saved micro-batch and sees exactly the batches
an uninterrupted run would have seen."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from distill_common.errors import DataError


class ResumableBatchSampler:
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        start_batch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if num_samples < batch_size:
            raise DataError(
                f"the training set has {num_samples} samples, fewer than one batch of {batch_size}; "
                "lower --batch-size or use more data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.num_replicas = num_replicas
        self.rank = rank
        self.per_epoch = num_samples // batch_size
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def global_batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(
                self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            )
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[position * self.batch_size : (position + 1) * self.batch_size].tolist()

    def batch(self, micro_batch: int) -> list[int]:
        """Indices of this process's ``micro_batch``-th batch."""
        return self.global_batch(micro_batch * self.num_replicas + self.rank)

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start_batch
        while True:
            yield self.batch(m)
            m += 1
