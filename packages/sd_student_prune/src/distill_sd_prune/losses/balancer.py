"""An optional magnitude balancer for the distillation terms.

Users of BK-SDM report the feature term dominating the others. The balancer keeps an exponential moving
average ``m_i`` (decay ``beta``, bias-corrected as in Adam) of each term's detached value and multiplies the
weight of every term except the reference (``task``) by ``m_ref / m_i``, so each weighted term contributes on
the scale of the task loss; the configured weights then set *relative* importance. The factors are reported
with the other weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class MagnitudeBalancer:
    def __init__(self, beta: float = 0.99, reference: str = "task", eps: float = 1e-12) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"balancer beta must lie in [0, 1), got {beta}")
        self.beta = beta
        self.reference = reference
        self.eps = eps
        self.averages: dict[str, float] = {}
        self.updates = 0

    def update(self, values: Mapping[str, float]) -> None:
        self.updates += 1
        for name, value in values.items():
            self.averages[name] = self.beta * self.averages.get(name, 0.0) + (1 - self.beta) * abs(
                float(value)
            )

    def _corrected(self, name: str) -> float:
        return self.averages[name] / (1 - self.beta**self.updates)

    def factors(self, names: list[str]) -> dict[str, float]:
        """The multiplier of each term's weight (1 for the reference, and for terms not seen yet)."""
        if not self.updates or self.reference not in self.averages:
            return dict.fromkeys(names, 1.0)
        ref = self._corrected(self.reference)
        return {
            n: 1.0
            if n == self.reference or n not in self.averages
            else ref / max(self._corrected(n), self.eps)
            for n in names
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "reference": self.reference,
            "averages": dict(self.averages),
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.reference = str(state["reference"])
        self.averages = {str(k): float(v) for k, v in dict(state["averages"]).items()}
        self.updates = int(state["updates"])
