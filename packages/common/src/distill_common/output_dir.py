"""The output folder of a run: checked writable before any work, and held by one run at a time.

:func:`claim_output_dir` is entered by every training and generation command before it loads data or
models: it creates the folder, proves it writable (a file written and removed), checks the MLflow store
when the run is tracked, and takes an exclusive lock (``fcntl.flock`` on ``OUTPUT_DIR/.distill.lock``,
which holds the owner's PID) for the whole run. A second run on the same folder fails at once, naming
the folder and the PID that holds it. The kernel drops a flock when its process dies, so the lock of a
killed run is stale by construction: the next run takes it over and says whose it was. A run that ends
removes the file (while still holding the lock; a run that opened the old file re-checks the inode). Under
``accelerate launch`` only the main process takes the lock (the other ranks write nothing there).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distill_common.errors import OutputDirError, os_error_text

LOCK_FILE = ".distill.lock"
_held: dict[Path, int] = {}  # folders this process holds -> nesting depth (a stage inside a pipeline re-enters)


def is_main_process() -> bool:
    """Rank 0 of ``accelerate launch`` / ``torchrun`` (as distill_common.runtime, without importing torch: the
    lock is taken before the heavy imports, so a refused run exits at once)."""
    return int(os.environ.get("RANK", "0")) == 0


def check_writable(folder: str | Path, flag: str = "--output-dir") -> Path:
    """Create ``folder`` and write a file into it; any failure is one line naming the folder and the fix."""
    folder = Path(folder)
    fix = f"pass another {flag} or fix the folder's permissions"
    for parent in (folder, *folder.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputDirError(f"output folder {folder}: {parent} is a file, not a folder; "
                                     f"remove it or pass another {flag}")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".distill-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"output folder {folder} is not writable ({os_error_text(exc)}); {fix}") from None
    return folder


def _read_owner(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 256).decode(errors="replace").split()
        pid = int(text[0]) if text and text[0].isdigit() and len(text[0]) <= 10 else None
    except (OSError, ValueError):
        return None
    return pid if pid is not None and 0 < pid < 2**31 else None  # a garbled or huge number is no owner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(folder: Path, owner: int | None, flag: str) -> OutputDirError:
    who = f"PID {owner}" if owner else "another process"
    stop = f" (stop it with: kill {owner})" if owner else ""
    return OutputDirError(f"output folder {folder} is in use by another distill run, {who}{stop}; "
                          f"wait for it to finish or pass another {flag}")


@contextmanager
def output_dir_lock(folder: str | Path, flag: str = "--output-dir", notice=None) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` for the ``with`` block (re-entrant within one process)."""
    folder = Path(folder)
    key = folder.resolve()
    if not is_main_process():
        yield folder
        return
    if key in _held:  # already held by this process (a stage inside a pipeline)
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    key.mkdir(parents=True, exist_ok=True)
    fd = _acquire(key / LOCK_FILE, folder, flag)
    try:
        previous = _read_owner(fd)
        if previous and previous != os.getpid() and notice is not None:
            state = "no longer running" if not _alive(previous) else "not holding it"
            notice(f"took over the stale lock of {folder} left by PID {previous} ({state})")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {' '.join(sys.argv)[:200]}\n".encode())
        _held[key] = 0
        try:
            yield folder
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                os.unlink(key / LOCK_FILE)  # still holding the flock: a waiting run re-checks the inode
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _acquire(path: Path, folder: Path, flag: str) -> int:
    """Open and flock ``path``; retried when the file was replaced or removed between the open and the lock."""
    import fcntl

    for _ in range(100):
        try:  # O_NOFOLLOW: a symlink planted as the lock file is refused, its target never written
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if path.is_symlink() or exc.errno == errno.ELOOP:
                raise OutputDirError(f"the lock file {path} is a symbolic link (to {os.readlink(path)}); distill "
                                     f"refuses to write through it: remove it, or pass another {flag}") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputDirError(f"the lock file {path} is not a regular file; remove it, or pass another {flag}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise _busy(folder, owner, flag) from None
        except OSError as exc:  # no flock on this file system (some NFS): fall back to the PID's liveness
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            owner = _read_owner(fd)
            if owner and owner != os.getpid() and _alive(owner):
                os.close(fd)
                raise _busy(folder, owner, flag) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released (and removed) it meanwhile: lock the current file
    raise OutputDirError(f"could not lock {folder}: its lock file keeps changing; pass another {flag}")


@contextmanager
def claim_output_dir(folder: str | Path, *, track: bool = False, flag: str = "--output-dir",
                     console=None) -> Iterator[Path]:
    """Check ``folder`` (and the MLflow store when ``track``) writable, then hold its lock: enter before any work."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if the run fails at once
    if is_main_process():
        check_writable(folder, flag)
        if track:
            from distill_common.tracking import check_store_writable

            try:
                check_store_writable()
            except BaseException:
                _remove_if_untouched(folder, created)  # a refused run leaves no folder behind
                raise
    else:
        Path(folder).mkdir(parents=True, exist_ok=True)

    def notice(msg: str) -> None:
        if console is not None:
            console.print(f"[yellow]note:[/] {msg}", highlight=False)
        else:
            print(f"note: {msg}", file=sys.stderr)

    try:
        with output_dir_lock(folder, flag, notice) as held:
            yield held
    except BaseException:
        _remove_if_untouched(folder, created)
        raise


def _remove_if_untouched(folder: Path, created: list[Path]) -> None:
    """A run that failed before writing anything leaves no folder behind (only folders it created, if empty)."""
    if not created or not folder.is_dir() or {p.name for p in folder.iterdir()} - {LOCK_FILE}:
        return
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        for path in created:  # deepest first
            path.rmdir()
    except OSError:
        pass


def claims_output_dir(folder_of: Callable[[Any], str | Path], flag: str = "--output-dir") -> Callable:
    """Decorate ``fn(cfg, ...)`` so that it runs holding ``folder_of(cfg)`` (see :func:`claim_output_dir`);
    tracked when ``cfg.track`` is true. Place it under ``@config_command``."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with claim_output_dir(folder_of(cfg), track=bool(getattr(cfg, "track", False)), flag=flag,
                                  console=kwargs.get("console")):
                return fn(cfg, *args, **kwargs)

        return run

    return decorate
