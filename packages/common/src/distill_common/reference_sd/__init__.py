"""The reference text-to-image model: a CIFAR-sized Stable Diffusion that this project trained and ships.

It is a diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it) kept as package data under
``reference_sd/pipeline/``, with ``MODEL_CARD.md`` and ``SHA256SUMS`` beside it. Every command that takes a base
model or teacher accepts the name ``reference`` for it; the files' sha256 are checked against ``SHA256SUMS`` the
first time the folder is resolved in a process (about 20 MB: tens of milliseconds).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from distill_common.checkpoint import file_sha256
from distill_common.errors import ModelLoadError

REFERENCE_SD_NAME = "reference"
REFERENCE_SD_ROOT = Path(__file__).parent
REFERENCE_SD_DIR = REFERENCE_SD_ROOT / "pipeline"
SHA256_FILE = REFERENCE_SD_ROOT / "SHA256SUMS"


def read_sha256sums(path: Path | None = None) -> dict[str, str]:
    """``relative path -> sha256`` from a ``sha256sum``-format file (default: the shipped model's)."""
    path = path or SHA256_FILE
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest
    return sums


def write_sha256sums(folder: Path, path: Path | None = None) -> dict[str, str]:
    """Hash every file under ``folder`` (paths relative to ``path``'s folder) into ``path``."""
    path = path or SHA256_FILE
    sums = {str(f.relative_to(path.parent)): file_sha256(f) for f in sorted(folder.rglob("*")) if f.is_file()}
    path.write_text("".join(f"{d}  {n}\n" for n, d in sums.items()))
    return sums


def verify_sha256sums(root: Path | None = None, sums_file: Path | None = None) -> None:
    """Raise ModelLoadError naming the first file whose sha256 differs from ``sums_file`` (or that is missing)."""
    root, sums_file = root or REFERENCE_SD_ROOT, sums_file or SHA256_FILE
    for name, digest in read_sha256sums(sums_file).items():
        path = root / name
        if not path.is_file():
            raise ModelLoadError(f"shipped weights are incomplete: {path} is missing; reinstall the package that "
                                 "ships them")
        if file_sha256(path) != digest:
            raise ModelLoadError(f"{path} does not match its sha256 in {sums_file}; the file was altered: reinstall "
                                 "the package that ships it")


@lru_cache(maxsize=1)
def reference_sd_folder() -> Path:
    """The shipped reference model's diffusers folder, its files verified against ``SHA256SUMS``."""
    if not (REFERENCE_SD_DIR / "model_index.json").is_file() or not SHA256_FILE.is_file():
        raise ModelLoadError(f"the reference text-to-image model is not shipped in this install ({REFERENCE_SD_DIR} "
                             "is missing); pass a diffusers folder or a hub id instead")
    verify_sha256sums()
    return REFERENCE_SD_DIR
