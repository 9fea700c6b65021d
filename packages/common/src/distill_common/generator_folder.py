"""A saved generator folder: ``generator.json`` (its family and settings) beside its weights, and the family
loaders registered under the ``distill.generators`` entry-point group.

Local folders only; :func:`distill_common.generator.load_generator` adds ``runs:/`` and ``models:/`` URIs through
the tracking layer, whose pyfunc model loads its downloaded folder through this module (so neither imports the
other in a circle).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from distill_common.errors import ModelLoadError, unknown_choice

GENERATOR_FILE = "generator.json"
ENTRY_POINT_GROUP = "distill.generators"


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


def generator_loaders() -> dict[str, Callable[..., Any]]:
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


def load_generator_folder(folder: str | Path, device: str = "auto", **kwargs: Any) -> Any:
    """Load a local generator folder with its family's loader (returns a ``distill_common.generator.Generator``)."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelLoadError(f"generator path {str(folder)!r} does not exist; pass a checkpoint folder or a models:/ URI")
    manifest = read_generator_manifest(folder)
    loaders = generator_loaders()
    family = manifest.get("family")
    if family not in loaders:
        raise unknown_choice("generator family (is its package installed?)", family, loaders)
    return loaders[family].load()(folder, device=device, **kwargs)
