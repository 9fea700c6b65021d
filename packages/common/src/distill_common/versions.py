"""Installed versions of the five workspace distributions (logged with every run and model, printed by
``distill --version``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTIONS = ("distill-common", "distill-eval", "distill-lora-flash", "distill-rf-cifar", "distill-sd-prune")


def package_versions() -> dict[str, str]:
    """Installed version of each workspace distribution ('not installed' when absent)."""
    out = {}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out
