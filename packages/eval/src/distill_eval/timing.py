"""Latency measurement that a reader can trust: warm-up, device synchronisation, percentiles, peak memory.

Every timed region is bracketed by ``distill_common.runtime.synchronize`` (``torch.cuda.synchronize``
on CUDA), so asynchronous kernel launches are not mistaken for finished work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from distill_common.runtime import environment_info, synchronize


@dataclass
class TimingResult:
    """Latency of one configuration; seconds are per call of ``fn`` (one batch)."""

    label: str
    batch_size: int
    batch_seconds: list[float]
    peak_memory_mb: float
    memory_kind: str  # "cuda_max_allocated" or "process_rss"
    stages: dict[str, float] = field(default_factory=dict)  # seconds per image, per stage
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * float(np.median(self.batch_seconds)) / self.batch_size

    @property
    def batch_p50_ms(self) -> float:
        return 1000.0 * float(np.percentile(self.batch_seconds, 50))

    @property
    def batch_p95_ms(self) -> float:
        return 1000.0 * float(np.percentile(self.batch_seconds, 95))

    @property
    def image_p50_ms(self) -> float:
        return self.batch_p50_ms / self.batch_size

    @property
    def image_p95_ms(self) -> float:
        return self.batch_p95_ms / self.batch_size

    @property
    def images_per_second(self) -> float:
        return self.batch_size * len(self.batch_seconds) / max(sum(self.batch_seconds), 1e-12)

    def summary(self) -> dict[str, Any]:
        out = {
            "label": self.label,
            "batch_size": self.batch_size,
            "repeats": len(self.batch_seconds),
            "ms_per_image": round(self.ms_per_image, 3),
            "image_p50_ms": round(self.image_p50_ms, 3),
            "image_p95_ms": round(self.image_p95_ms, 3),
            "batch_p50_ms": round(self.batch_p50_ms, 3),
            "batch_p95_ms": round(self.batch_p95_ms, 3),
            "images_per_second": round(self.images_per_second, 3),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "memory_kind": self.memory_kind,
        }
        out.update({f"stage_{k}_ms_per_image": round(v * 1000, 3) for k, v in self.stages.items()})
        out.update(self.environment)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except (ImportError, OSError):
        return float("nan")


def measure_latency(
    fn: Callable[[], Any],
    *,
    label: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    stage_timer: Any = None,
    dtype: str = "",
) -> TimingResult:
    """Time ``fn`` (one batch) ``repeats`` times after ``warmup`` untimed calls.

    ``stage_timer`` is an optional :class:`distill_common.runtime.Timer` that ``fn`` fills with
    per-stage sections (text encoder, denoiser, decoder); it is reset after warm-up.
    """
    device = torch.device(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
    if stage_timer is not None:
        stage_timer.reset()
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, kind = _rss_mb(), "process_rss"
    stages = {}
    if stage_timer is not None and stage_timer.sections:
        n_images = batch_size * repeats
        stages = {k: v / n_images for k, v in stage_timer.sections.items()}
    env = {k: v for k, v in environment_info(device).items()}
    env["dtype"] = dtype
    return TimingResult(label, batch_size, times, peak, kind, stages, env)


def time_generator(
    generator: Any,
    num_steps: int,
    *,
    conditions: Sequence[Any],
    seeds: Sequence[int] | None = None,
    guidance: float | None = None,
    warmup: int = 1,
    repeats: int = 3,
    label: str | None = None,
    device: torch.device | str | None = None,
) -> TimingResult:
    """Latency of ``generator.generate`` for one batch of ``conditions`` at ``num_steps``."""
    seeds = list(seeds) if seeds is not None else list(range(len(conditions)))
    dev = device or getattr(generator, "device", "cpu")
    stage_timer = getattr(generator, "stage_timer", None)
    return measure_latency(
        lambda: generator.generate(list(conditions), num_steps, seeds, guidance),
        label=label or f"{getattr(generator, 'family', 'generator')}@{num_steps}",
        batch_size=len(conditions),
        device=dev,
        warmup=warmup,
        repeats=repeats,
        stage_timer=stage_timer,
        dtype=str(getattr(generator, "dtype", "")),
    )
