"""Training progress in [0, 1]: 0 at the first optimiser step, 1 at the last (``step / (total - 1)``)."""

from __future__ import annotations


def training_progress(step: int, total_steps: int) -> float:
    """``step`` is the 0-based optimiser step; a one-step run is at progress 1."""
    if total_steps <= 1:
        return 1.0
    return min(1.0, max(0.0, step / (total_steps - 1)))


def linear(start: float, end: float, progress: float) -> float:
    progress = min(1.0, max(0.0, progress))
    return start + (end - start) * progress
