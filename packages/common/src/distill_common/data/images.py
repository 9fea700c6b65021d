"""Image files that do not decode: skipped and counted, or refused with the file named (``strict``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from distill_common.errors import DataError

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def unreadable_image(path: str | Path, err: BaseException, strict_flag: str | None = "--strict") -> DataError:
    skip = f", or drop {strict_flag} to skip unreadable images" if strict_flag else ""
    return DataError(f"unreadable image {path} ({type(err).__name__}: {err}); replace or delete it{skip}")


def decode_rgb(path: str | Path) -> Image.Image:
    """The image fully decoded as RGB (a truncated file fails here, not later)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return image.convert("RGB")


def check_images(paths: Iterable[str | Path], strict: bool = False,
                 strict_flag: str | None = "--strict") -> tuple[list[Path], list[str]]:
    """Split ``paths`` into files that decode and ``"path: reason"`` for those that do not (``strict`` raises)."""
    good: list[Path] = []
    bad: list[str] = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image.verify()
        except IMAGE_ERRORS as err:
            if strict:
                raise unreadable_image(path, err, strict_flag) from None
            bad.append(f"{path}: {type(err).__name__}: {err}")
            continue
        good.append(Path(path))
    return good, bad


def skipped_note(bad: list[str], where: str | Path) -> str:
    """One line for the run's output: how many files were skipped, and the first of them."""
    return f"skipped {len(bad)} unreadable image(s) in {where} (first: {bad[0]})"
