"""CIFAR-10 on any machine: when no data root holds it, the official archive is downloaded once into the user cache.

The archive is Krizhevsky's ``cifar-10-python.tar.gz`` (md5 ``c58f30108f718f92721af3b95e74349a``), fetched
from ``$DISTILL_CIFAR10_URL`` (default: the University of Toronto's URL) with a rich progress bar, checked
against that md5 (``$DISTILL_CIFAR10_MD5`` overrides it for a mirror of another archive) and unpacked into
``<cache>/cifar10/cifar-10-batches-py`` (``<cache>``: ``$DISTILL_CACHE_DIR``, else ``$XDG_CACHE_HOME/distill``,
else ``~/.cache/distill``). The batches are Python pickles: they are read with an unpickler that builds only
dicts, lists, str/bytes, numbers and numpy arrays (every other class or function is refused: the batches hold
numpy arrays and lists), so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from distill_common.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
URL_ENV = "DISTILL_CIFAR10_URL"
MD5_ENV = "DISTILL_CIFAR10_MD5"
BATCHES_DIR = "cifar-10-batches-py"
SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def cache_dir() -> Path:
    from distill_common.models.tokenizer import distill_cache_dir

    return distill_cache_dir() / "cifar10"


def manual_fix() -> str:
    return (f"set DISTILL_DATA_ROOT (or pass --data-root) to a folder holding cifar10/ (WebDataset shards "
            f"train-*.tar/test-*.tar or {BATCHES_DIR}/), or download {CIFAR10_URL} by hand and unpack it into "
            f"{cache_dir()}")


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,  # how protocol 2 writes bytes from Python 3
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, numbers and numpy arrays only: any other class or function is refused."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        make = _ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: CIFAR-10 batches hold only arrays, "
                                         "lists and bytes")
        return make()


def read_batch(path: str | Path) -> dict:
    """One ``data_batch_*`` / ``test_batch`` file as a dict of plain data (keys decoded to str)."""
    try:
        with open(path, "rb") as handle:
            raw = _DataOnlyUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(f"{path} is not a CIFAR-10 batch ({err}); delete {Path(path).parent} to download it again") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (a {type(raw).__name__}); delete it to download it again")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def load_batches(folder: str | Path, split: str) -> tuple[torch.Tensor, list[int]]:
    """(N, 3, 32, 32) uint8 images and labels of ``split`` from a ``cifar-10-batches-py`` folder."""
    images, labels = [], []
    for name in SPLIT_FILES[split]:
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"{path} is missing; delete {folder} to download CIFAR-10 again, or {manual_fix()}")
        batch = read_batch(path)
        data, batch_labels = batch.get("data"), batch.get("labels")
        if not isinstance(data, (np.ndarray, bytes, list)) or not isinstance(batch_labels, list):
            raise DataError(f"{path} lacks 'data' or 'labels'; delete {folder} to download CIFAR-10 again")
        array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data, dtype=np.uint8)
        if array.size != len(batch_labels) * 3072:
            raise DataError(f"{path} holds {array.size} bytes for {len(batch_labels)} images (3072 each); "
                            f"delete {folder} to download CIFAR-10 again")
        images.append(torch.from_numpy(array.reshape(-1, 3, 32, 32).copy()))
        labels += [int(v) for v in batch_labels]
    return torch.cat(images), labels


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - the published checksum of the archive is an md5
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(target: Path | None = None, *, show_progress: bool = True, timeout: float = 30.0) -> Path:
    """Download, check and unpack the archive; returns the ``cifar-10-batches-py`` folder (reused when present)."""
    target = target or cache_dir()
    batches = target / BATCHES_DIR
    if all((batches / n).is_file() for names in SPLIT_FILES.values() for n in names):
        return batches
    url = os.environ.get(URL_ENV) or CIFAR10_URL
    expected = os.environ.get(MD5_ENV) or CIFAR10_MD5
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the CIFAR-10 cache {target} ({err.strerror}); set DISTILL_CACHE_DIR to a "
                        f"writable folder, or {manual_fix()}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=".cifar-10-python.", suffix=".tar.gz", dir=target)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                kind = str(resp.headers.get("Content-Type") or "")
                if kind.startswith(("text/html", "text/plain")):  # a login page or an error page, not the archive
                    raise DataError(f"{url} served a web page ({kind.split(';')[0]}), not the CIFAR-10 archive; check "
                                    f"the mirror, or {manual_fix()}")
                total = int(resp.headers.get("Content-Length") or 0) or None
                columns = (TextColumn("[bold]CIFAR-10"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
                with Progress(*columns, disable=not show_progress) as bar:
                    task = bar.add_task("download", total=total)
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
                        bar.advance(task, len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise DataError(f"CIFAR-10 is not on this machine and downloading {url} failed ({reason}); "
                            f"{manual_fix()}") from None
        actual = _md5(tmp)
        if actual != expected:
            raise DataError(f"the CIFAR-10 archive from {url} has md5 {actual}, not {expected}; it was not used. "
                            f"Retry later, or {manual_fix()}")
        with open(tmp, "rb") as fh:
            head = fh.read(2)
        if head != b"\x1f\x8b":
            raise DataError(f"the file from {url} is not a .tar.gz archive (it starts with {head!r}; a web page?); it "
                            f"was not used. Check the mirror, or {manual_fix()}")
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target))
        try:
            try:
                _unpack(tmp, staging, url)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:  # truncated or garbled (md5 matched)
                raise DataError(f"the CIFAR-10 archive from {url} is truncated or damaged ({type(err).__name__}: "
                                f"{err}); it was not used. Retry the download, or {manual_fix()}") from None
            shutil.rmtree(batches, ignore_errors=True)
            staging.rename(batches)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        tmp.unlink(missing_ok=True)
    return batches


def _unpack(tmp: Path, staging: Path, url: str) -> None:
    """Only the known batch files of the archive, written by name into ``staging``: no path tricks."""
    with tarfile.open(tmp, "r:gz") as tar:
        wanted = {f"{BATCHES_DIR}/{n}" for names in SPLIT_FILES.values() for n in names}
        members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
        if {m.name for m in members} != wanted:
            raise DataError(f"the archive from {url} lacks {sorted(wanted - {m.name for m in members})}; "
                            f"{manual_fix()}")
        for member in members:
            (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())


def find_batches(root: Path | None) -> Path | None:
    """A ``cifar-10-batches-py`` folder in the data root (``root``, ``root/cifar10``) or the cache, if any."""
    candidates = [root, root / "cifar10", root / "cifar10" / BATCHES_DIR, root / BATCHES_DIR] if root else []
    candidates.append(cache_dir() / BATCHES_DIR)
    for folder in candidates:
        if folder is not None and (folder / "test_batch").is_file() and folder.name == BATCHES_DIR:
            return folder
    return None
