"""The distillation objective: a weighted sum of the loss terms whose weights may follow the KD weight
schedule alpha(t) and the magnitude balancer. Every term, its effective weight and alpha are reported
separately.

With the alpha schedule on, the task term is weighted ``task_weight * (1 - alpha)`` and each KD term
``kd_weight * alpha`` (Hinton et al. 2015's convex mix), so alpha = 1 is pure distillation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from distill_sd_prune.losses.balancer import MagnitudeBalancer
from distill_sd_prune.losses.terms import TERMS
from distill_sd_prune.schedules.kd_alpha import KDAlphaSchedule


@dataclass(frozen=True)
class LossWeights:
    task: float = 1.0
    output_kd: float = 0.0
    feature_kd: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"task": self.task, "output_kd": self.output_kd, "feature_kd": self.feature_kd}

    @property
    def needs_teacher(self) -> bool:
        return self.output_kd > 0 or self.feature_kd > 0


class DistillObjective:
    """``objective(terms, progress) -> (total, report)``; ``active_terms`` says which terms to compute."""

    def __init__(
        self,
        weights: LossWeights,
        alpha: KDAlphaSchedule | None = None,
        balancer: MagnitudeBalancer | None = None,
    ) -> None:
        self.weights = weights
        self.alpha = alpha
        self.balancer = balancer

    @property
    def active_terms(self) -> list[str]:
        return [t for t in TERMS if self.weights.as_dict()[t] > 0]

    def effective_weights(self, progress: float) -> tuple[dict[str, float], float | None]:
        base = self.weights.as_dict()
        alpha = self.alpha(progress) if self.alpha is not None else None
        weights = {}
        for term in self.active_terms:
            if alpha is None:
                weights[term] = base[term]
            else:
                weights[term] = base[term] * ((1.0 - alpha) if term == "task" else alpha)
        if self.balancer is not None:
            factors = self.balancer.factors(list(weights))
            weights = {t: w * factors[t] for t, w in weights.items()}
        return weights, alpha

    def __call__(
        self, terms: Mapping[str, torch.Tensor], progress: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        missing = [t for t in self.active_terms if t not in terms]
        if missing:
            raise RuntimeError(f"loss terms {missing} have a positive weight but were not computed")
        weights, alpha = self.effective_weights(progress)
        total = sum(weights[t] * terms[t] for t in self.active_terms)
        values = {t: float(terms[t].detach()) for t in self.active_terms}
        if self.balancer is not None:
            self.balancer.update(values)
        report = {f"loss/{t}": v for t, v in values.items()}
        report.update({f"weight/{t}": w for t, w in weights.items()})
        report["loss/total"] = float(total.detach())
        if alpha is not None:
            report["kd_alpha"] = alpha
        return total, report
