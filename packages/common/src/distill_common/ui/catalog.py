"""What the page offers: registered generators grouped by family and role, their metrics and evaluation plots.

Everything here reads the registry through :mod:`distill_common.tracking` and :mod:`distill_common.promotion`,
so the page imports no subproject. A version's family is its ``family`` tag, else the registered name's
prefix (``rf_cifar-student`` -> ``rf_cifar``); its role is its ``role`` tag, else the name's suffix. A registry
with no registered version (or no store yet) offers the generators shipped inside the installed families instead
(``reference``, the CIFAR-10 teacher; ``sd-reference``), by name, as teachers.
"""

from __future__ import annotations

import fnmatch
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distill_common import promotion, tracking
from distill_common.errors import ModelLoadError, TrackingError
from distill_common.generator import generator_loaders, named_generators, read_generator_manifest

KNOWN_FAMILIES = ("rf_cifar", "lora_flash", "sd_student_prune")
CONDITION_KINDS = {"rf_cifar": "class", "lora_flash": "prompt", "sd_student_prune": "prompt"}
OTHER_FAMILY = "other"
PLOT_FOLDER = "plots"  # the artifact folder every evaluation logs its plots under
PLOT_PATTERN = "*_vs_*.png"  # fid_vs_steps.png, fid_vs_nfe.png, fid_vs_latency.png
TEACHER, STUDENT = "teacher", "student"
# The `distill registry compare` columns: (header, metric key of the eval.s{steps}.{metric} tags).
METRIC_COLUMNS = (("FID", "fid"), ("KID", "kid"), ("CLIPScore", "clip_score"),
                  ("LPIPS to teacher", "lpips_to_teacher"), ("ms/image", "ms_per_image"))


@dataclass(frozen=True)
class ModelChoice:
    """One selectable generator: a registered version reached through an alias or its number."""

    name: str
    version: str
    family: str
    role: str
    alias: str | None = None
    shipped: bool = False  # a generator shipped inside an installed family, loaded by its name (no registry)

    @property
    def uri(self) -> str:
        if self.shipped:
            return self.name
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        if self.shipped:
            return f"{self.name} (shipped)"
        return f"{self.name}@{self.alias} (v{self.version})" if self.alias else f"{self.name} v{self.version}"


@dataclass
class Catalog:
    """Model choices per family, plus every version's registry record for the metrics tab."""

    choices: dict[str, list[ModelChoice]] = field(default_factory=dict)
    versions: dict[str, list[tracking.ModelVersionInfo]] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        """The workspace's families first, in KNOWN_FAMILIES order (the CIFAR-10 main job first), then the rest."""
        order = {f: i for i, f in enumerate(KNOWN_FAMILIES)}
        return sorted(self.choices, key=lambda f: (f == OTHER_FAMILY, order.get(f, len(order)), f))

    @property
    def shipped_only(self) -> bool:
        """Nothing registered: every choice is a shipped generator."""
        return bool(self.choices) and all(c.shipped for cs in self.choices.values() for c in cs)

    def of_role(self, family: str, role: str) -> list[ModelChoice]:
        return [c for c in self.choices.get(family, []) if c.role == role]

    def models(self, family: str) -> list[str]:
        return sorted({c.name for c in self.choices.get(family, [])})


def known_families() -> list[str]:
    """Families with an installed loader, plus the workspace's own (longest first, for prefix matching)."""
    return sorted(set(KNOWN_FAMILIES) | set(generator_loaders()), key=len, reverse=True)


def _norm(text: str) -> str:
    return re.sub(r"[-_. ]+", "_", text.lower())


def family_of(name: str, tags: dict[str, str], families: Sequence[str]) -> str:
    if tags.get("family"):
        return tags["family"]
    norm = _norm(name)
    for fam in families:
        if norm == fam or norm.startswith(fam + "_"):
            return fam
    return OTHER_FAMILY


def role_of(name: str, tags: dict[str, str]) -> str:
    role = tags.get("role", "").lower()
    if role in (TEACHER, STUDENT):
        return role
    return TEACHER if TEACHER in _norm(name).split("_") else STUDENT


def shipped_choices(families: Sequence[str] | None = None) -> list[ModelChoice]:
    """The generators shipped inside the installed families (:func:`distill_common.generator.named_generators`),
    one choice per folder under its plain name (``reference``, ``sd-reference``), as teachers of their family."""
    families = known_families() if families is None else families
    choices, seen = [], set()
    for name, folder in sorted(named_generators().items(), key=lambda item: (":" in item[0], item[0])):
        if folder in seen:
            continue
        seen.add(folder)
        try:
            manifest = read_generator_manifest(folder)
        except ModelLoadError:
            continue  # an incomplete package: nothing to offer
        family = str(manifest.get("family") or family_of(name, {}, families))
        role = STUDENT if manifest.get("role") == STUDENT else TEACHER
        choices.append(ModelChoice(name, "", family, role, shipped=True))
    return choices


def shipped_catalog() -> Catalog:
    """A catalog of the shipped generators alone (a registry with nothing registered, or none reachable)."""
    cat = Catalog()
    for choice in shipped_choices():
        cat.choices.setdefault(choice.family, []).append(choice)
    return cat


def build_catalog(model_names: Iterable[str] | None = None) -> Catalog:
    """Every registered version, offered under each of its aliases (newest first) and by number; with none
    registered, the shipped generators (:func:`shipped_catalog`)."""
    families = known_families()
    cat = Catalog()
    for name in model_names if model_names is not None else tracking.list_models():
        infos = tracking.list_versions(name)
        cat.versions[name] = infos
        by_alias, by_number = [], []
        for info in reversed(infos):
            fam, role = family_of(name, info.tags, families), role_of(name, info.tags)
            by_alias += [ModelChoice(name, info.version, fam, role, alias) for alias in sorted(info.aliases)]
            by_number.append(ModelChoice(name, info.version, fam, role))
        for choice in by_alias + by_number:
            cat.choices.setdefault(choice.family, []).append(choice)
    return cat if cat.choices else shipped_catalog()


def compare_rows(infos: Sequence[tracking.ModelVersionInfo]) -> list[dict[str, object]]:
    """The ``distill registry compare`` table as rows: one per evaluated (version, steps)."""
    rows = []
    for info in infos:
        for steps, metrics in sorted(promotion.step_metrics(info).items()) or [(None, {})]:
            row: dict[str, object] = {"model": info.name, "version": info.version, "aliases": ", ".join(info.aliases),
                                      "steps": steps}
            row.update({header: metrics.get(key) for header, key in METRIC_COLUMNS})
            row["params"] = info.tags.get("params", "n/a")
            rows.append(row)
    return rows


def protocols(infos: Sequence[tracking.ModelVersionInfo]) -> list[str]:
    """Distinct metric protocols (compact JSON, key order ignored) the versions were evaluated under."""
    return sorted(protocol_groups(infos)[0])


protocol_groups = promotion.protocol_groups


def latest_eval_run(infos: Sequence[tracking.ModelVersionInfo]) -> str | None:
    """The most recently started evaluation run among the versions' ``eval.run_id`` tags."""
    run_ids = {i.tags["eval.run_id"] for i in infos if i.tags.get("eval.run_id")}
    started = {r: t for r in run_ids if (t := tracking.run_start_time(r)) is not None}
    return max(started, key=started.get) if started else None


def eval_plots(run_id: str, dst: str | Path | None = None) -> list[Path]:
    """The plots an evaluation run logged: ``plots/*_vs_*.png`` (where ``distill eval benchmark``, ``distill rf
    evaluate`` and ``distill prune evaluate`` log them); runs logged before plots had one place are searched
    whole. Empty when the run logged none."""
    try:
        listed = tracking.list_run_artifacts(run_id)
        wanted = [p for p in listed if fnmatch.fnmatch(Path(p).name, PLOT_PATTERN)]
        in_place = [p for p in wanted if Path(p).parent.name == PLOT_FOLDER]
        wanted = in_place or wanted
        target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="distill-plots-"))
        return [tracking.download_run_artifacts(run_id, p, target) for p in wanted]
    except TrackingError:
        return []
