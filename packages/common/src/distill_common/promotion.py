"""Champion promotion: move the ``champion`` alias only to a version that passes the gate and wins.

Evaluation numbers live on registry versions as tags ``eval.s{steps}.{metric}`` with the metric
protocol in ``eval.protocol`` (written by ``distill eval benchmark``). A version's score is its best
value of the metric over the step counts that pass the gate (``steps <= max_steps`` and, when given,
``ms_per_image <= max_latency_ms``). Versions evaluated under different protocols are never compared.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import re
from dataclasses import dataclass, field
from typing import Any

from distill_common import tracking
from distill_common.errors import ConfigError, TrackingError

_STEP_METRIC = re.compile(r"^s(\d+)\.(.+)$")
LOWER_IS_BETTER = {"fid": True, "kid": True, "lpips_to_teacher": True, "ms_per_image": True, "clip_score": False}


@dataclass
class Candidate:
    version: str
    steps: int
    value: float
    ms_per_image: float | None
    protocol: str | None


@dataclass
class PromotionDecision:
    name: str
    metric: str
    promote: bool
    reason: str
    previous: Candidate | None
    chosen: Candidate | None
    considered: list[Candidate] = field(default_factory=list)

    def as_tags(self) -> dict[str, Any]:
        return {
            "promotion.metric": self.metric,
            "promotion.previous_version": self.previous.version if self.previous else "none",
            "promotion.previous_value": self.previous.value if self.previous else "none",
            "promotion.new_value": self.chosen.value if self.chosen else "none",
            "promotion.steps": self.chosen.steps if self.chosen else "none",
            "promotion.by": getpass.getuser(),
            "promotion.at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }


def step_metrics(info: tracking.ModelVersionInfo) -> dict[int, dict[str, float]]:
    """``{steps: {metric: value}}`` from a version's ``eval.s{steps}.{metric}`` tags."""
    out: dict[int, dict[str, float]] = {}
    for key, value in info.metrics.items():
        m = _STEP_METRIC.match(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return out


def best_candidate(info: tracking.ModelVersionInfo, metric: str, max_steps: int | None,
                   max_latency_ms: float | None) -> Candidate | None:
    lower = LOWER_IS_BETTER.get(metric, True)
    best: Candidate | None = None
    for steps, metrics in sorted(step_metrics(info).items()):
        if metric not in metrics or (max_steps is not None and steps > max_steps):
            continue
        ms = metrics.get("ms_per_image")
        if max_latency_ms is not None and (ms is None or ms > max_latency_ms):
            continue
        cand = Candidate(info.version, steps, metrics[metric], ms, info.tags.get("eval.protocol"))
        if best is None or (cand.value < best.value if lower else cand.value > best.value):
            best = cand
    return best


def _protocol_difference(a: str | None, b: str | None) -> str:
    pa, pb = json.loads(a or "{}"), json.loads(b or "{}")
    diffs = [f"{k}: {pa.get(k)!r} vs {pb.get(k)!r}" for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
    return "; ".join(diffs)


def decide(name: str, metric: str = "fid", *, max_steps: int | None = 4, max_latency_ms: float | None = None,
           min_improvement: float = 0.0) -> PromotionDecision:
    """Pick the best gated version; promote only if it beats the champion by ``min_improvement`` (metric units)."""
    versions = tracking.list_versions(name)
    if not versions:
        raise TrackingError(f"registered model {name!r} has no versions; see 'distill registry list'")
    lower = LOWER_IS_BETTER.get(metric, True)
    cands = [c for v in versions if (c := best_candidate(v, metric, max_steps, max_latency_ms)) is not None]
    if not cands:
        known = sorted({k.split(".", 1)[1] for v in versions for k in v.metrics if "." in k})
        raise ConfigError(
            f"no version of {name!r} has an evaluated {metric!r} within the gate (steps <= {max_steps}"
            f"{f', ms <= {max_latency_ms}' if max_latency_ms else ''}); evaluated metrics: {', '.join(known) or 'none'}. "
            "Run 'distill eval benchmark' on its versions first"
        )
    protocols = {c.protocol for c in cands}
    if len(protocols) > 1:
        a, b = sorted(protocols, key=str)[:2]
        raise ConfigError(f"versions of {name!r} were evaluated under different protocols ({_protocol_difference(a, b)}); "
                          "re-evaluate them with one 'distill eval benchmark' run")
    best = (min if lower else max)(cands, key=lambda c: c.value)
    current_info = tracking.version_by_alias(name, tracking.CHAMPION)
    current = best_candidate(current_info, metric, max_steps, max_latency_ms) if current_info else None
    if current_info is not None and current is None:
        current = Candidate(current_info.version, -1, float("inf") if lower else float("-inf"), None, None)
    if current is not None and current.protocol not in (None, best.protocol):
        raise ConfigError(f"the champion of {name!r} was evaluated under another protocol "
                          f"({_protocol_difference(current.protocol, best.protocol)}); re-evaluate it")
    if current is None:
        return PromotionDecision(name, metric, True, f"no champion yet; v{best.version} is best", None, best, cands)
    if current.version == best.version:
        return PromotionDecision(name, metric, False, f"v{best.version} is already champion", current, best, cands)
    gain = (current.value - best.value) if lower else (best.value - current.value)
    if gain <= min_improvement:
        return PromotionDecision(name, metric, False, f"v{best.version} improves {metric} by {gain:.4g}, not more than "
                                 f"--min-improvement {min_improvement}", current, best, cands)
    return PromotionDecision(name, metric, True, f"v{best.version} beats v{current.version} by {gain:.4g} {metric}",
                             current, best, cands)


def apply(decision: PromotionDecision) -> None:
    """Move the alias and record the decision on the new champion (tags and description)."""
    if not decision.promote or decision.chosen is None:
        return
    tags = decision.as_tags()
    prev = tracking.version_by_alias(decision.name, tracking.CHAMPION)
    if prev is not None:
        tracking.set_alias(decision.name, tracking.CHALLENGER, prev.version)
    tracking.set_alias(decision.name, tracking.CHAMPION, decision.chosen.version)
    info = next(v for v in tracking.list_versions(decision.name) if v.version == decision.chosen.version)
    note = (f"Promoted to champion at {tags['promotion.at']} by {tags['promotion.by']}: {decision.reason} "
            f"({decision.metric} {decision.chosen.value:.4g} at {decision.chosen.steps} steps).")
    tracking.set_version_tags(decision.name, decision.chosen.version, tags,
                              description=(info.description + "\n" if info.description else "") + note)
