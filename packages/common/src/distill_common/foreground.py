"""Run a server (``distill registry serve``, ``distill ui``) as a child that never outlives this process.

The child runs in its own process group. SIGTERM, SIGINT and SIGHUP sent to this process are forwarded
to that whole group, and after the child exits the group's stragglers (e.g. a process a server started in
the background) are terminated, then killed after a grace period: when :func:`run_foreground`
returns, nothing it started listens on a port any more. On Linux the child also gets SIGTERM if this
process dies without a chance to forward (``kill -9``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_S = 10.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group ``pgid``."""
    if sys.platform.startswith("linux") and os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM the group, wait up to ``grace_s`` for it to end, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.05)


def run_foreground(cmd: Sequence[str], env: Mapping[str, str] | None = None, grace_s: float = GRACE_S) -> int:
    """Run ``cmd`` until it exits or this process is told to stop; returns its exit code (0 when stopped by a
    forwarded signal). A child still running ``grace_s`` after the signal is killed. On return no process of
    its group is left."""
    received: list[int] = []
    first_at: list[float] = []
    proc: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        received.append(signum)
        first_at.append(time.monotonic())
        if proc is not None:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        if received:  # a signal arrived while the child was starting
            os.killpg(proc.pid, received[0])
        rc = None
        while rc is None:
            try:
                rc = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:  # told to stop but still running after the grace period: kill
                if first_at and time.monotonic() - first_at[0] > grace_s:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            stop_group(proc.pid, grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if received else rc


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port another program listens on, in one line, before anything is downloaded or started."""
    import errno
    import socket

    from distill_common.errors import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"{flag} {port} is not a TCP port; pass a number from 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--host {host!r} does not resolve ({exc.strerror or exc}); pass e.g. --host 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use by another program; pass another "
                                  f"{flag} (e.g. {flag} {port + 1}) or stop that program") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ConfigError(f"port {port} on {host} needs privileges; pass a {flag} above 1023") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host} is not an address of this machine; pass e.g. --host 127.0.0.1") from None
            raise
