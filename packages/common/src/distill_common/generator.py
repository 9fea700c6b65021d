"""The one interface every subproject's sampler implements, and how a saved generator is found again.

A generator folder holds ``generator.json`` (its family and settings) beside its safetensors weights.
Families register a loader under the ``distill.generators`` entry-point group, so a local folder, a
run artifact (``runs:/ID/path``) and a registered model (``models:/NAME@ALIAS``) all resolve to a
:class:`Generator` without this package importing any subproject.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from distill_common.errors import ModelLoadError, unknown_choice

GENERATOR_FILE = "generator.json"
ENTRY_POINT_GROUP = "distill.generators"


@runtime_checkable
class Generator(Protocol):
    """Images from conditions at a step count; one seed per condition, so equal seeds mean equal noise."""

    family: str  # "rf_cifar", "lora_flash", "sd_student_prune"
    condition_kind: Literal["class", "prompt"]
    resolution: int
    default_steps: int

    def generate(
        self, conditions: Sequence[Any], num_steps: int, seeds: Sequence[int], guidance: float | None = None
    ) -> torch.Tensor:
        """Return float images (N, 3, H, W) in [0, 1] on the CPU, N = len(conditions) = len(seeds)."""
        ...


def write_generator_manifest(folder: str | Path, family: str, **info: Any) -> Path:
    """Write ``generator.json`` naming the family whose loader reads this folder."""
    path = Path(folder) / GENERATOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"family": family, **info}, indent=2, default=str))
    return path


def read_generator_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / GENERATOR_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{str(folder)!r} is not a generator folder (no {GENERATOR_FILE}); pass a folder written by a "
            "distill training command, a runs:/ID/PATH or a models:/NAME@ALIAS URI"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is corrupt ({exc}); re-export the generator") from None


def generator_loaders() -> dict[str, Callable[..., Generator]]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}  # type: ignore[misc]


def named_generators() -> dict[str, Path]:
    """Generators shipped inside installed families (e.g. ``reference``: rf_cifar's reference teacher).

    A family module exposes ``named_generators() -> {name: folder}`` beside its loader; each name is also
    reachable as ``FAMILY:NAME``.
    """
    import importlib

    names: dict[str, Path] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module = importlib.import_module(ep.value.split(":", 1)[0])
        for name, folder in getattr(module, "named_generators", dict)().items():
            names.setdefault(name, Path(folder))
            names[f"{ep.name}:{name}"] = Path(folder)
    return names


def resolve_generator_folder(source: str | Path) -> Path:
    """A generator folder from a local folder, a shipped name (``reference``), ``runs:/…`` or ``models:/…``."""
    src = str(source)
    if src.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        from distill_common.tracking import download_generator

        return Path(download_generator(src))
    folder = Path(src)
    if folder.exists():
        return folder
    if "/" not in src and "\\" not in src:
        named = named_generators()
        if src in named:
            return named[src]
        hint = f"a shipped name ({', '.join(sorted(named))}), " if named else ""
        raise ModelLoadError(f"generator {src!r} is neither a folder nor a shipped generator; pass {hint}"
                             "a generator folder, a runs:/ID/PATH or a models:/NAME@ALIAS URI")
    raise ModelLoadError(f"generator path {src!r} does not exist; pass a checkpoint folder or a models:/ URI")


def load_generator(source: str | Path, device: str = "auto", **kwargs: Any) -> Generator:
    """Resolve a local folder, a shipped name, ``runs:/…`` or ``models:/…`` URI to a ready :class:`Generator`."""
    folder = resolve_generator_folder(source)
    manifest = read_generator_manifest(folder)
    loaders = generator_loaders()
    family = manifest.get("family")
    if family not in loaders:
        raise unknown_choice("generator family (is its package installed?)", family, loaders)
    return loaders[family].load()(folder, device=device, **kwargs)
