"""`distill registry serve` answers a REST call in MLflow's scoring format with PNG images, on loopback, and stops
computing a request whose client disconnects."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from rf_fixtures import tiny_rf_generator
from server_fixtures import free_port, stop_pid

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_serve_registered_generator_over_rest(mlflow_uri, tmp_path):
    from distill_common import tracking

    folder = tiny_rf_generator(tmp_path / "student", role="student", default_steps=2, seed=0)
    with tracking.start_run("serve-test", "student") as run:
        uri = tracking.log_generator_model(run, folder)
    version = tracking.register_model(uri, "rf_cifar-student")
    tracking.set_alias("rf_cifar-student", "champion", version)

    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "distill"), "registry", "serve", "rf_cifar-student@champion",
                             "--port", str(port), "--max-steps", "10000"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "model server did not start in 240 s"
            time.sleep(1)
        body = json.dumps({"dataframe_split": {"columns": ["condition", "seed", "steps"],
                                               "data": [[3, 0, 2], [5, 1, 2]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds = json.loads(r.read())["predictions"]
        assert [p["condition"] for p in preds] == [3, 5] and [p["seed"] for p in preds] == [0, 1]
        images = [Image.open(io.BytesIO(base64.b64decode(p["image"]))) for p in preds]
        assert all(img.format == "PNG" and img.size == (32, 32) for img in images)
        assert images[0].tobytes() != images[1].tobytes()  # different seeds and classes

        # a request of minutes whose client goes away: the server cancels it and is free again within seconds
        big = json.dumps({"dataframe_split": {"columns": ["condition", "steps"],
                                              "data": [[i % 10, 10_000] for i in range(64)]}}).encode()
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(big) + big)
        time.sleep(2)
        client.close()
        closed = time.time()
        while "the client disconnected" not in (tmp_path / "serve.log").read_text():
            assert time.time() - closed < 15, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.2)
        line = [x for x in (tmp_path / "serve.log").read_text().splitlines() if "the client disconnected" in x]
        assert len(line) == 1 and "request cancelled after" in line[0], line
        start = time.time()
        with urllib.request.urlopen(req, timeout=120) as r:  # the model is free again
            assert len(json.loads(r.read())["predictions"]) == 2
        assert time.time() - start < 30
    finally:
        stop_pid(proc.pid)
        log.close()
    proc.wait(timeout=30)  # ended (a SIGKILL from stop_pid may take a moment on a loaded machine)
