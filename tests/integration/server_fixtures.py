"""Helpers for integration tests: free loopback ports, a real MLflow server started by tools/mlflow_server.sh, and
`accelerate launch` of the CLI on two CPU processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


def checkout_env(**env: str) -> dict[str, str]:
    """Environment of a CLI subprocess: CPU only, one thread, this checkout's sources first on the path, and MLflow's
    store embedded in its working folder; ``env`` adds or overrides variables."""
    src = [str(p) for p in sorted((REPO / "packages").glob("*/src"))]
    out = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([*src, os.environ.get("PYTHONPATH", "")]), **env)
    for name in ("MLFLOW_TRACKING_URI", "DISTILL_ARTIFACT_ROOT"):
        out.pop(name, None)
    return out


def launch_two_processes(cli_args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of ``distill_common.cli`` with two CPU processes (gloo) in :func:`checkout_env`; asserts
    that every rank exited 0."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "distill_common.cli", *cli_args]
    proc = subprocess.run(cmd, cwd=cwd, env=checkout_env(**env), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc
