"""Champion promotion: move the ``champion`` alias only to a version that passes the gate and wins.

Evaluation numbers live on registry versions as tags ``eval.s{steps}.{metric}`` with the metric
protocol in ``eval.protocol`` (written by ``distill eval benchmark``). A version's score is its best
value of the metric over the step counts that pass the gate (``steps <= max_steps`` and, when given,
``ms_per_image <= max_latency_ms``). Versions evaluated under different protocols (compared as parsed
JSON, so key order does not matter) are never compared; NaN or infinite values are never scores.

When both the challenger and the champion carry 95% intervals (``eval.s{steps}.{metric}_ci95_low`` /
``_ci95_high``), the challenger wins only if the intervals do not overlap; otherwise the
``min_improvement`` rule decides, and the decision says so.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from distill_common import tracking
from distill_common.errors import ConfigError, TrackingError

_STEP_METRIC = re.compile(r"^s(\d+)\.(.+)$")
LOWER_IS_BETTER = {"fid": True, "kid": True, "lpips_to_teacher": True, "ms_per_image": True, "clip_score": False,
                   "class_accuracy": False}


CI_LOW, CI_HIGH = "ci95_low", "ci95_high"
RULE_CI, RULE_MIN = "ci95", "min_improvement"


@dataclass
class Candidate:
    version: str
    steps: int
    value: float
    ms_per_image: float | None
    protocol: dict[str, Any] | None
    ci95: tuple[float, float] | None = None  # 95% interval of ``value``, when the evaluation wrote one


@dataclass
class PromotionDecision:
    name: str
    metric: str
    promote: bool
    reason: str
    previous: Candidate | None
    chosen: Candidate | None
    considered: list[Candidate] = field(default_factory=list)
    rule: str = RULE_MIN  # which rule decided: non-overlapping 95% intervals, or --min-improvement

    def as_tags(self) -> dict[str, Any]:
        def ci(c: Candidate | None) -> str:
            return f"[{c.ci95[0]:.6g}, {c.ci95[1]:.6g}]" if c and c.ci95 else "none"

        prev_value = self.previous.value if self.previous and math.isfinite(self.previous.value) else "none"
        return {
            "promotion.metric": self.metric,
            "promotion.rule": self.rule,
            "promotion.reason": self.reason,
            "promotion.previous_version": self.previous.version if self.previous else "none",
            "promotion.previous_value": prev_value,
            "promotion.previous_ci95": ci(self.previous),
            "promotion.new_value": self.chosen.value if self.chosen else "none",
            "promotion.new_ci95": ci(self.chosen),
            "promotion.steps": self.chosen.steps if self.chosen else "none",
            "promotion.by": getpass.getuser(),
            "promotion.at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }


def step_metrics(info: tracking.ModelVersionInfo) -> dict[int, dict[str, float]]:
    """``{steps: {metric: value}}`` from a version's ``eval.s{steps}.{metric}`` tags (finite values only)."""
    out: dict[int, dict[str, float]] = {}
    for key, value in info.metrics.items():
        m = _STEP_METRIC.match(key)
        if m and math.isfinite(value):
            out.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return out


def read_protocol(info: tracking.ModelVersionInfo) -> dict[str, Any] | None:
    """The parsed ``eval.protocol`` tag (None when absent); a malformed tag is a one-line ConfigError."""
    raw = info.tags.get("eval.protocol")
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as exc:
        parsed, problem = None, f"not JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
    else:
        problem = None if isinstance(parsed, dict) else f"a JSON {type(parsed).__name__}, not an object"
    if problem:
        raise ConfigError(f"{info.name} v{info.version} has an unreadable eval.protocol tag ({problem}); "
                          f"re-evaluate it with 'distill eval benchmark' or delete the tag")
    return parsed


def protocol_groups(infos: Sequence[tracking.ModelVersionInfo]) -> tuple[dict[str, list[str]], list[str]]:
    """({protocol as sorted JSON: ["NAME vN", ...]}, ["NAME vN" whose eval.protocol tag is unreadable])."""
    groups: dict[str, list[str]] = {}
    unreadable: list[str] = []
    for info in infos:
        try:
            proto = read_protocol(info)
        except ConfigError:
            unreadable.append(f"{info.name} v{info.version}")
            continue
        if proto is not None:
            groups.setdefault(json.dumps(proto, sort_keys=True), []).append(f"{info.name} v{info.version}")
    return groups, unreadable


def protocol_difference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """The fields in which two parsed protocols differ, as ``field: a vs b; ...``."""
    if a is None or b is None:
        return "eval.protocol: " + ("missing" if a is None else "present") + " vs " + ("missing" if b is None else "present")
    diffs = [f"{k}: {a.get(k, '(absent)')!r} vs {b.get(k, '(absent)')!r}"
             for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k) or (k in a) != (k in b)]
    return "; ".join(diffs)


def _interval(metrics: dict[str, float], metric: str) -> tuple[float, float] | None:
    low, high = metrics.get(f"{metric}_{CI_LOW}"), metrics.get(f"{metric}_{CI_HIGH}")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)) or low > high:
        return None
    return (low, high)


def best_candidate(info: tracking.ModelVersionInfo, metric: str, max_steps: int | None,
                   max_latency_ms: float | None) -> Candidate | None:
    lower = LOWER_IS_BETTER.get(metric, True)
    best: Candidate | None = None
    for steps, metrics in sorted(step_metrics(info).items()):
        if metric not in metrics or (max_steps is not None and steps > max_steps):
            continue
        if not math.isfinite(metrics[metric]):  # never ranked
            continue
        ms = metrics.get("ms_per_image")
        if max_latency_ms is not None and (ms is None or ms > max_latency_ms):
            continue
        cand = Candidate(info.version, steps, metrics[metric], ms, read_protocol(info), _interval(metrics, metric))
        if best is None or (cand.value < best.value if lower else cand.value > best.value):
            best = cand
    return best


def _beats(new: Candidate, old: Candidate, metric: str, lower: bool, min_improvement: float) -> tuple[bool, str, str]:
    """(wins, rule, reason) for ``new`` against the champion ``old``."""
    d = (old.value - new.value) if lower else (new.value - old.value)
    gain = f"{d:.4g} {metric}"
    if new.ci95 and old.ci95:
        clear = new.ci95[1] < old.ci95[0] if lower else new.ci95[0] > old.ci95[1]
        intervals = (f"95% intervals v{new.version} [{new.ci95[0]:.4g}, {new.ci95[1]:.4g}] vs "
                     f"v{old.version} [{old.ci95[0]:.4g}, {old.ci95[1]:.4g}]")
        if not clear:
            return False, RULE_CI, f"v{new.version} improves by {gain}, within the {intervals} (they overlap)"
        if d <= min_improvement:
            return False, RULE_CI, (f"v{new.version} improves by {gain}, not more than --min-improvement "
                                    f"{min_improvement}")
        return True, RULE_CI, f"v{new.version} beats v{old.version} by {gain}; {intervals} do not overlap"
    missing = " and ".join(f"v{c.version}" for c in (new, old) if not c.ci95)
    note = f"no 95% interval on {missing}, so the --min-improvement rule decided"
    if d <= min_improvement:
        return False, RULE_MIN, f"v{new.version} improves by {gain}, not more than --min-improvement {min_improvement} ({note})"
    return True, RULE_MIN, f"v{new.version} beats v{old.version} by {gain} ({note})"


def decide(name: str, metric: str = "fid", *, max_steps: int | None = 4, max_latency_ms: float | None = None,
           min_improvement: float = 0.0, eligible: Collection[str] | None = None,
           eligible_reason: str = "the eligible versions") -> PromotionDecision:
    """Pick the best gated version; promote it only if it beats the champion: by non-overlapping 95% intervals when
    both carry them (and by more than ``min_improvement``), else by more than ``min_improvement`` (metric units).

    ``eligible`` (version numbers) narrows the gate further, e.g. to the students that meet a comparison's goal; a
    champion outside it is replaced by the best eligible version, as one without a score within the gate is."""
    versions = tracking.list_versions(name)
    if not versions:
        raise TrackingError(f"registered model {name!r} has no versions; see 'distill registry list'")
    allowed = None if eligible is None else {str(v) for v in eligible}
    if allowed is not None:
        versions = [v for v in versions if str(v.version) in allowed]
        if not versions:
            raise ConfigError(f"no version of {name!r} is among {eligible_reason} ({', '.join(sorted(allowed)) or 'none'})")
    lower = LOWER_IS_BETTER.get(metric, True)
    cands = [c for v in versions if (c := best_candidate(v, metric, max_steps, max_latency_ms)) is not None]
    if not cands:
        known = sorted({k.split(".", 1)[1] for v in versions for k in v.metrics if "." in k})
        raise ConfigError(
            f"no version of {name!r} has an evaluated {metric!r} within the gate (steps <= {max_steps}"
            f"{f', ms <= {max_latency_ms}' if max_latency_ms else ''}); evaluated metrics: {', '.join(known) or 'none'}. "
            "Run 'distill eval benchmark' on its versions first"
        )
    for c in cands[1:]:
        if c.protocol != cands[0].protocol:
            raise ConfigError(f"v{cands[0].version} and v{c.version} of {name!r} were evaluated under different "
                              f"protocols (differing fields: {protocol_difference(cands[0].protocol, c.protocol)}); "
                              "re-evaluate them with one 'distill eval benchmark' run")
    best = (min if lower else max)(cands, key=lambda c: c.value)
    current_info = tracking.version_by_alias(name, tracking.CHAMPION)
    current = best_candidate(current_info, metric, max_steps, max_latency_ms) if current_info else None
    if current_info is not None and allowed is not None and str(current_info.version) not in allowed:
        previous = current or Candidate(current_info.version, -1, float("nan"), None, None)
        return PromotionDecision(name, metric, True, f"the champion v{current_info.version} is not among "
                                 f"{eligible_reason}; v{best.version} is the best of them", previous, best, cands)
    if current_info is not None and current is None:  # champion never scored (or only NaN): any score beats it
        current = Candidate(current_info.version, -1, float("inf") if lower else float("-inf"), None, None)
    if current is not None and current.protocol is not None and current.protocol != best.protocol:
        raise ConfigError(f"the champion v{current.version} of {name!r} was evaluated under another protocol "
                          f"(differing fields: {protocol_difference(current.protocol, best.protocol)}); re-evaluate it")
    if current is None:
        return PromotionDecision(name, metric, True, f"no champion yet; v{best.version} is best", None, best, cands)
    if current.version == best.version:
        return PromotionDecision(name, metric, False, f"v{best.version} is already champion", current, best, cands)
    if not math.isfinite(current.value):
        return PromotionDecision(name, metric, True, f"the champion v{current.version} has no finite {metric} within "
                                 f"the gate; v{best.version} is best", current, best, cands)
    wins, rule, reason = _beats(best, current, metric, lower, min_improvement)
    return PromotionDecision(name, metric, wins, reason, current, best, cands, rule=rule)


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
