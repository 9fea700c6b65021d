"""Helpers for integration tests: free loopback ports, a real MLflow server started by tools/mlflow_server.sh."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_pid(pid: int) -> None:
    try:
        os.killpg(os.getpgid(pid), signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_server(state_dir: Path, port: int) -> int:
    env = dict(os.environ, MLFLOW_SERVER_DIR=str(state_dir), MLFLOW=str(REPO / ".venv" / "bin" / "mlflow"))
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([str(REPO / "tools" / "mlflow_server.sh"), "--port", str(port), "--workers", "1"],
                         env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[0])
