"""Inception features of image sets and their FID statistics (mean, covariance), the layer under both
:mod:`distill_eval.fid` and :mod:`distill_eval.reference_stats`.

Mean/covariance come from torch-fidelity's ``fid_features_to_statistics``; extraction batches images under
``torch.inference_mode`` with a progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics

from distill_common.errors import ConfigError


def as_features(features: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if tensor.dim() != 2:
        raise ConfigError(f"{name} must be a (N, D) feature matrix, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < 2:
        raise ConfigError(f"{name} holds {tensor.shape[0]} sample(s); FID/KID need at least 2 images per set")
    return tensor


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, via torch-fidelity."""
    stats = fid_features_to_statistics(as_features(features, "features"))
    return stats["mu"], stats["sigma"]



def _batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Re-chunk a tensor, or an iterable of (B, 3, H, W) batches / (3, H, W) images, into batches."""
    if torch.is_tensor(images):
        yield from images.split(batch_size)
        return
    pending: list[torch.Tensor] = []
    count = 0
    for item in images:
        chunk = item.unsqueeze(0) if item.dim() == 3 else item
        pending.append(chunk)
        count += chunk.shape[0]
        if count >= batch_size:
            merged = torch.cat(pending)
            full = count - count % batch_size
            yield from merged[:full].split(batch_size)
            pending, count = ([merged[full:]], count - full) if count > full else ([], 0)
    if count:
        yield torch.cat(pending)


def extract_features(
    images: torch.Tensor | Iterable[torch.Tensor],
    extractor: nn.Module,
    batch_size: int = 64,
    progress: bool = True,
    total: int | None = None,
) -> torch.Tensor:
    """Run ``extractor`` over images in batches under ``torch.inference_mode``; returns (N, D) float32 on the CPU."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}; pass --batch-size 1 or more")
    if total is None and torch.is_tensor(images):
        total = images.shape[0]
    chunks: list[torch.Tensor] = []
    columns = (TextColumn("Inception features"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    start = time.perf_counter()
    with Progress(*columns, transient=True, disable=not progress) as bar, torch.inference_mode():
        task = bar.add_task("features", total=total)
        for batch in _batches(images, batch_size):
            chunks.append(extractor(batch).float().cpu())
            bar.advance(task, batch.shape[0])
        seconds = time.perf_counter() - start
        if progress and seconds > 2:  # the bar goes; one line saying what it did stays on screen
            n = sum(c.shape[0] for c in chunks)
            bar.console.print(f"Inception features: {n:,} images in {seconds:.1f} s ({n / seconds:.1f} images/s)",
                              highlight=False)
    if not chunks:
        raise ConfigError("no images were given to the feature extractor; check the image source is not empty")
    return torch.cat(chunks)


def psd_sqrt(matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (float64), via ``eigh``; negative
    round-off eigenvalues are clamped to zero."""
    m = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
    m = (m + m.T) / 2
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T
