"""User-facing errors: one line that names the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import errno
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


class OutputDirError(DistillError):
    """An output folder cannot be written, or another run holds it."""


class TrainingDivergedError(DistillError):
    """A loss became NaN or infinite."""


class NonFiniteImagesError(DistillError):
    """A generation yielded NaN or infinite pixels (never written as black images)."""


def check_finite_images(images, what: str) -> None:
    """Raise :class:`NonFiniteImagesError` naming ``what`` when a tensor of images holds NaN or infinity."""
    import torch

    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images.reshape(images.shape[0], -1))).any(dim=1).sum()) if images.ndim else 1
        raise NonFiniteImagesError(f"{what} yielded NaN or infinite pixels in {bad} of {images.shape[0] if images.ndim else 1} "
                                   "image(s); nothing was written: check the weights (a diverged checkpoint?) and "
                                   "pass a finite, moderate --guidance")


def unknown_choice(kind: str, name: object, valid: Iterable[object]) -> ConfigError:
    """Build the standard error for a name outside a registry: it lists the valid names."""
    valid_list = ", ".join(repr(v) for v in sorted(valid, key=str))
    return ConfigError(f"unknown {kind} {name!r}; valid choices: {valid_list}")


_OS_FIXES = {
    errno.ENOSPC: "free disk space or write to another disk",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EACCES: "fix the permissions or choose a writable folder",
    errno.EPERM: "fix the permissions or choose a writable folder",
    errno.EROFS: "the file system is read-only; choose a folder on a writable one",
    errno.ENOTDIR: "a file stands where a folder is expected; remove it or choose another path",
    errno.EEXIST: "a file stands where a folder is expected; remove it or choose another path",
    errno.EISDIR: "a folder stands where a file is expected; remove it or choose another path",
    errno.ENOENT: "check the path",
}


def os_error_text(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the errno text and its symbolic name."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def os_error_message(exc: OSError) -> str:
    """One line for an OSError at the CLI boundary: the path(s), the errno text and a fix."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    fix = _OS_FIXES.get(exc.errno or 0, "check the path and the disk")
    where = f"{paths}: " if paths else ""
    return f"{where}{os_error_text(exc)}; {fix}"
