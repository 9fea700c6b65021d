"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``checkpoint-{step}`` (no zero padding, as diffusers' training scripts and Accelerate
name them; the older ``checkpoint-0000500`` spelling is still found and resumed) holding safetensors weights and a
``training_state.pt`` (optimizer, scheduler, RNG states, data position), written to a temporary
sibling and renamed into place, so a kill leaves either the previous or the new checkpoint, never
half of one. ``training_state.pt`` is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill_common.errors import ModelLoadError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.pt"


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # name the file being written, for the one-line error
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors as safetensors (contiguous CPU copies), atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        code = re.search(r"code: (\d+)", str(exc)) if not isinstance(exc, OSError) else None
        if code:  # safetensors wraps the OS error (disk full, ...) in its own type: give the OSError back
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        raise


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist; pass a checkpoint folder written by a distill command")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise ModelLoadError(f"weights file {str(path)!r} is corrupt or not safetensors ({exc}); re-create it") from None


def load_into(module: torch.nn.Module, path: str | Path, what: str = "model") -> None:
    """Load safetensors weights into ``module``; a checkpoint of another architecture is a clear error."""
    state = load_weights(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{'…' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys
        )
        raise ModelLoadError(
            f"{path} does not fit this {what} ({detail}); it was written for another architecture — "
            "use the config it was trained with"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelLoadError(f"{path} holds NaN or infinite weights ({', '.join(bad[:3])}{'…' if len(bad) > 3 else ''}); "
                             "it is from a diverged run: use an earlier checkpoint or retrain")
    module.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads them back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _named_os_error(exc: BaseException, path: Path) -> OSError:
    """The OSError behind a writer's own exception (safetensors' ``code: 28``, torch's "file write failed"), naming
    ``path``; a full disk is recognised by the free space left when the writer does not say."""
    if isinstance(exc, OSError):
        return exc if exc.filename is not None else OSError(exc.errno, exc.strerror or str(exc), str(path))
    code = re.search(r"code: (\d+)", str(exc))
    if code:
        number = int(code.group(1))
    else:
        try:
            st = os.statvfs(path.parent)
            number = errno.ENOSPC if st.f_bavail * st.f_frsize < 64 << 20 else errno.EIO
        except OSError:
            number = errno.EIO
    return OSError(number, os.strerror(number), str(path))


def save_training_state(folder: Path, state: Mapping[str, Any]) -> None:
    path = Path(folder) / STATE_FILE
    try:
        torch.save(dict(state), path)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write (disk full) as a RuntimeError
        path.unlink(missing_ok=True)
        raise _named_os_error(exc, path) from None


def save_image(image: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a PIL image atomically (a temporary sibling renamed into place); an OS fault (disk full, read-only)
    is an OSError naming ``path``, and no partial file is left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _named_os_error(exc, path) from None
        raise
    return path


def load_training_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no {STATE_FILE}; it is not a resumable checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} is corrupt or was not written by distill ({exc}); delete that checkpoint") from None


def _checkpoint_folders(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``checkpoint-N`` under ``root``, by step; padded names (``checkpoint-0000500``) count."""
    by_step: dict[int, Path] = {}
    for step, p in _checkpoint_folders(Path(root)):
        # both spellings of one step (an old padded folder next to a new one): the canonical name wins
        if step not in by_step or p.name == f"checkpoint-{step}":
            by_step[step] = p
    return sorted(by_step.items())


def latest_checkpoint(root: str | Path) -> Path | None:
    cps = list_checkpoints(root)
    return cps[-1][1] if cps else None


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """``root/checkpoint-{step}``, e.g. ``checkpoint-500`` (diffusers' and Accelerate's name)."""
    return Path(root) / f"checkpoint-{step}"


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    kept = {step for step, _ in list_checkpoints(root)[-keep:]}
    for step, p in _checkpoint_folders(Path(root)):
        if step not in kept:
            shutil.rmtree(p, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 4 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, default=str).encode())
