"""Bad inputs against the real servers (issue 13, rows 1, 4, 15): `distill registry serve` refuses a foreign
pyfunc before anything loads it, answers bad requests with a one-line reason, and `serve` / `ui` leave nothing
listening after SIGTERM or SIGINT. Real subprocesses on loopback, short timeouts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hostile_models import register_pickled_pyfunc
from rf_fixtures import tiny_rf_generator
from server_fixtures import free_port, stop_pid

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DISTILL = str(REPO / ".venv" / "bin" / "distill")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start(args: list[str], tmp_path: Path, mlflow_uri: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{args[0]}.log"
    proc = subprocess.Popen([DISTILL, *args], env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri), cwd=tmp_path,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"{url} did not answer in {timeout} s"
        time.sleep(0.5)


def stop_and_check(proc: subprocess.Popen, sig: int, port: int) -> None:
    """Send ``sig`` to the distill process only (as `kill PID` does); afterwards nothing may listen on the port."""
    from distill_common.foreground import group_alive

    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=60)  # the server gets 10 s to stop, then is killed
    except subprocess.TimeoutExpired:
        pytest.fail(f"{signal.Signals(sig).name} did not stop the command in 60 s")
    leftover = group_alive(proc.pid)
    still = listening(port)
    stop_pid(proc.pid)  # clean up whatever an unfixed command left behind before failing
    assert not still, f"port {port} still listens after {signal.Signals(sig).name}"
    assert not leftover, f"processes of the server's group outlived {signal.Signals(sig).name}"


def test_serve_refuses_a_pickled_pyfunc_before_loading_it(mlflow_uri, tmp_path):
    marker = tmp_path / "marker"
    version = register_pickled_pyfunc(tmp_path, marker)
    port = free_port()
    proc, log = start(["registry", "serve", f"evil/{version}", "--port", str(port)], tmp_path, mlflow_uri)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_pid(proc.pid)
    out = log.read_text()
    assert not marker.exists(), "the pickled model's code ran"
    assert proc.returncode == 2, out[-2000:]
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "refusing models:/evil/1" in lines[0] and "Traceback" not in out
    assert not listening(port)


def test_serve_answers_bad_requests_in_one_line_and_stops_on_sigterm(mlflow_uri, tmp_path):
    from distill_common import tracking

    folder = tiny_rf_generator(tmp_path / "student", role="student", default_steps=2, seed=0)
    with tracking.start_run("serve-bad", "student") as run:
        uri = tracking.log_generator_model(run, folder)
    version = tracking.register_model(uri, "rf_cifar-student")
    port = free_port()
    proc, log = start(["registry", "serve", f"rf_cifar-student/{version}", "--port", str(port)], tmp_path, mlflow_uri)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout=240)

        def post(rows: list[list]) -> tuple[int, str]:
            body = json.dumps({"dataframe_split": {"columns": ["condition", "seed", "steps"], "data": rows}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        assert post([[3, 0, 1]])[0] == 200
        for rows, reason in (([[3, 0, -1]], "steps must be at least 1, got -1"),
                             ([[99, 0, 2]], "class condition must lie in 0..9, got 99")):
            status, body = post(rows)
            assert status == 400, body
            payload = json.loads(body)
            assert reason in payload["message"] and "\n" not in payload["message"], payload
            assert "Traceback" not in body and 'File "' not in body and ".py" not in body and "stack_trace" not in body
        stop_and_check(proc, signal.SIGTERM, port)
    finally:
        stop_pid(proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_with_its_server_on_a_signal(mlflow_uri, tmp_path, sig):
    port = free_port()
    proc, log = start(["ui", "--port", str(port)], tmp_path, mlflow_uri)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, log, timeout=240)
        stop_and_check(proc, sig, port)
        assert proc.returncode == 0, log.read_text()[-2000:]
    finally:
        stop_pid(proc.pid)
