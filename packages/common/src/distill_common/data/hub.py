"""Hugging Face Hub data sets, for users with internet: fail fast and clearly when the Hub is out of reach."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from distill_common.errors import DataError

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``)."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub endpoint (``HF_ENDPOINT``), instead of ``datasets``' ~25 s of retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub_dataset(name: str, split: str, fix: str, **kwargs: Any):
    """``datasets.load_dataset(name, split=split)``; any failure becomes a one-line DataError ending in ``fix``.

    In offline mode a cached copy is still used. A local folder ``name`` never touches the network.
    """
    local = Path(name).expanduser().exists()
    if not local and not hub_offline() and not hub_reachable():
        raise DataError(f"hub data set {name!r} needs the Hugging Face Hub, which is unreachable; {fix}")
    import datasets

    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except Exception as err:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot load hub data set {name!r} split {split!r} ({reason}); {fix}") from err
