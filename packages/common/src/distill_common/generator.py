"""The one interface every subproject's sampler implements, and how a saved generator is found again.

A generator folder holds ``generator.json`` (its family and settings) beside its safetensors weights
(:mod:`distill_common.generator_folder`). Families register a loader under the ``distill.generators`` entry-point
group, so a local folder, a run artifact (``runs:/ID/path``) and a registered model (``models:/NAME@ALIAS``) all
resolve to a :class:`Generator` without this package importing any subproject.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from distill_common.errors import ModelLoadError
from distill_common.generator_folder import (
    ENTRY_POINT_GROUP,
    GENERATOR_FILE,
    generator_loaders,
    load_generator_folder,
    named_generators,
    read_generator_manifest,
    write_generator_manifest,
)

__all__ = [
    "ENTRY_POINT_GROUP", "GENERATOR_FILE", "Generator", "generator_loaders", "load_generator",
    "load_generator_folder", "named_generators", "read_generator_manifest", "resolve_generator_folder",
    "write_generator_manifest",
]

URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/")
_noted: set[str] = set()  # shipped names whose shadowing local folder was already noted in this process


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


def resolve_generator_folder(source: str | Path) -> Path:
    """A generator folder from a local folder, a shipped name (``reference``), ``runs:/…`` or ``models:/…``."""
    src = str(source)
    if src.startswith(URI_PREFIXES):
        from distill_common.tracking import download_generator

        return Path(download_generator(src))
    folder = Path(src)
    if "/" not in src and "\\" not in src:
        named = named_generators()
        if src in named:  # a shipped name wins; a local folder of that name is reached as ./NAME
            if folder.exists() and src not in _noted:
                import sys

                _noted.add(src)
                print(f"note: '{src}' names the shipped generator {named[src]}; the folder ./{src} here is "
                      f"ignored (pass ./{src} to load it)", file=sys.stderr)
            return named[src]
    if folder.exists():
        return folder
    named = named_generators()
    hint = f"a shipped name ({', '.join(sorted(named))}), " if named else ""
    if "/" not in src and "\\" not in src:
        named = named_generators()
        hint = f"a shipped name ({', '.join(sorted(named))}), " if named else ""
        raise ModelLoadError(f"generator {src!r} is neither a folder nor a shipped generator; pass {hint}"
                             "a generator folder, a runs:/ID/PATH or a models:/NAME@ALIAS URI")
    raise ModelLoadError(f"generator path {src!r} does not exist; pass {hint}a generator folder, a runs:/ID/PATH or "
                         "a models:/NAME@ALIAS URI")


def load_generator(source: str | Path, device: str = "auto", **kwargs: Any) -> Generator:
    """Resolve a local folder, a shipped name, ``runs:/…`` or ``models:/…`` URI to a ready :class:`Generator`."""
    return load_generator_folder(resolve_generator_folder(source), device=device, **kwargs)
