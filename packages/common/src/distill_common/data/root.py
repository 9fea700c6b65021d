"""Where the data lives: one data root (an option or ``DISTILL_DATA_ROOT``) holding ``cifar10/`` and ``coco2017/``."""

from __future__ import annotations

import os
from pathlib import Path

from distill_common.errors import DataError

DATA_ROOT_ENV = "DISTILL_DATA_ROOT"


def _git_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return None


def default_data_root() -> Path | None:
    """``<repo>/../shared/data`` for the repository layout, where the repo is the CWD's git root (else the CWD).

    Returns None when that folder does not exist.
    """
    cwd = Path.cwd().resolve()
    base = _git_root(cwd) or cwd
    candidate = base.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def resolve_data_root(explicit: str | Path | None = None) -> Path:
    """The data root: ``explicit`` first, then the env var ``DISTILL_DATA_ROOT``, then the repo-layout default."""
    if explicit is not None and str(explicit) != "":
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist; pass --data-root with an existing folder")
        return root.resolve()
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(
                f"{DATA_ROOT_ENV}={env} does not exist; point it (or --data-root) at an existing folder"
            )
        return root.resolve()
    default = default_data_root()
    if default is not None:
        return default
    raise DataError(
        f"no data root given; pass --data-root PATH or set the environment variable {DATA_ROOT_ENV}=PATH"
    )


def find_dataset_dir(root: str | Path | None, name: str, marker: str) -> Path:
    """The folder of data set ``name``: ``root`` itself when it holds ``marker`` (a glob), else ``root/name``.

    ``root`` may thus be the data root or the data set's own folder; None resolves the data root.
    """
    base = resolve_data_root(root)
    for folder in (base, base / name):
        if folder.is_dir() and any(folder.glob(marker)):
            return folder
    raise DataError(
        f"no {name} data found in {base} or {base / name} (looked for {marker}); "
        f"pass --data-root with the folder that holds {name}/"
    )
