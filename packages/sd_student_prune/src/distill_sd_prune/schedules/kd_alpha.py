"""The KD weight alpha(t) of the seed's V2.2: linear in training progress from ``start`` (1.0) to ``end``
(0.5)."""

from __future__ import annotations

from dataclasses import dataclass

from distill_common.errors import ConfigError
from distill_sd_prune.schedules.progress import linear


@dataclass(frozen=True)
class KDAlphaSchedule:
    start: float = 1.0
    end: float = 0.5

    def __post_init__(self) -> None:
        for value in (self.start, self.end):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"KD alpha must lie in [0, 1], got {value}; pass e.g. --loss-kd-alpha-end 0.5"
                )

    def __call__(self, progress: float) -> float:
        return linear(self.start, self.end, progress)
