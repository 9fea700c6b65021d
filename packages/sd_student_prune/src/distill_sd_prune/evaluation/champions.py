"""Registering students and choosing champions per parameter budget.

Every registered student version carries the tag ``budget`` (its prune plan, plus ``-wNNN`` when narrowed,
e.g. ``sd_small``, ``sd_tiny``, ``none-w050``) with ``params`` and ``macs``. After an evaluation has stamped
``eval.s{steps}.fid`` on versions (``distill prune evaluate``, or ``distill eval benchmark``), the alias
``champion-<budget>`` goes to the version with the lowest FID at the headline step count among the versions of
that budget -- only when they were all evaluated under one protocol, guidance and sampler. So
``models:/sd_student_prune@champion-sd_tiny`` always names the best tiny student, and a small student never
"loses" to a larger one.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_common.errors import ConfigError

CHAMPION_PREFIX = "champion-"
BUDGET_TAG = "budget"


def champion_alias(budget: str) -> str:
    return f"{CHAMPION_PREFIX}{budget}"


@dataclass
class ChampionDecision:
    budget: str
    alias: str
    version: str
    value: float
    previous: str | None

    @property
    def changed(self) -> bool:
        return self.previous != self.version


def register_student(run: Any, generator_dir: str | Path, name: str, info: Mapping[str, Any]) -> str:
    """Log ``generator_dir`` as a pyfunc model in ``run`` and register it as a new version of ``name``."""
    from distill_common import tracking

    uri = tracking.log_generator_model(run, generator_dir)
    tags = {BUDGET_TAG: info["budget"], "family": "sd_student_prune"}
    tags.update(
        {k: info[k] for k in ("params", "macs", "plan", "width", "init", "recipe", "resolution") if k in info}
    )
    return tracking.register_model(
        uri,
        name,
        tags=tags,
        description=f"{info.get('recipe', '')} student, budget {info['budget']}, "
        f"{info.get('params', '?')} parameters",
    )


def promote_per_budget(name: str, steps: int = 25, metric: str = "fid") -> list[ChampionDecision]:
    """Move ``champion-<budget>`` to the best evaluated version of each budget (lower ``metric`` is
    better)."""
    from distill_common import tracking

    key = f"s{steps}.{metric}"
    groups: dict[str, list[Any]] = {}
    for version in tracking.list_versions(name):
        if BUDGET_TAG in version.tags and key in version.metrics:
            groups.setdefault(version.tags[BUDGET_TAG], []).append(version)
    decisions = []
    for budget, versions in sorted(groups.items()):
        protocols = {
            (v.tags.get("eval.protocol"), v.tags.get("eval.guidance"), v.tags.get("eval.sampler"))
            for v in versions
        }
        if len(protocols) > 1:
            raise ConfigError(
                f"versions of {name!r} with budget {budget!r} were evaluated under different protocols, "
                "guidance or samplers; re-evaluate them together with one 'distill prune evaluate' run"
            )
        best = min(versions, key=lambda v: v.metrics[key])
        alias = champion_alias(budget)
        current = tracking.version_by_alias(name, alias)
        decision = ChampionDecision(
            budget, alias, best.version, best.metrics[key], current.version if current else None
        )
        if decision.changed:
            tracking.set_alias(name, alias, best.version)
            tracking.set_version_tags(
                name,
                best.version,
                {
                    "champion.budget": budget,
                    "champion.metric": key,
                    "champion.value": best.metrics[key],
                    "champion.previous_version": decision.previous or "none",
                    "champion.at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                },
            )
        decisions.append(decision)
    return decisions
