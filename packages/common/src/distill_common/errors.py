"""User-facing errors: one line that names the problem and the fix, and a non-zero exit."""

from __future__ import annotations

from collections.abc import Iterable


class DistillError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line and exits 2."""

    exit_code = 2


class ConfigError(DistillError, ValueError):
    """An option has a value outside its valid set."""


class DataError(DistillError):
    """A data set is missing, empty or unreadable."""


class ModelLoadError(DistillError):
    """A model or checkpoint cannot be loaded (unreachable hub, wrong folder, other architecture)."""


class TrackingError(DistillError):
    """The MLflow tracking store or registry cannot be used."""


class TrainingDivergedError(DistillError):
    """A loss became NaN or infinite."""


def unknown_choice(kind: str, name: object, valid: Iterable[object]) -> ConfigError:
    """Build the standard error for a name outside a registry: it lists the valid names."""
    valid_list = ", ".join(repr(v) for v in sorted(valid, key=str))
    return ConfigError(f"unknown {kind} {name!r}; valid choices: {valid_list}")
