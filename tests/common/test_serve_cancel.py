"""`distill registry serve` cancels a request whose client disconnects or whose time runs out: the worker stops
sampling within a forward and frees the CPU. The server runs in-process (uvicorn in a thread on a free loopback
port) on a real logged pyfunc model, and the client really closes its socket."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from stand_in_generators import NoiseGenerator

from distill_common import cancel

STEP_S = 0.02  # one SlowGenerator step: 200 steps (the default --max-steps) would take 4 s


class SlowGenerator:
    """A stand-in sampler that runs one small network forward per step and counts its steps."""

    family = "test_slow"
    condition_kind = "class"
    resolution = 32
    default_steps = 2
    num_classes = 10
    steps_done = 0
    running = False

    def __init__(self, folder: Path, device: str = "auto"):
        self.net = torch.nn.Linear(8, 8)

    @torch.no_grad()
    def generate(self, conditions, num_steps, seeds, guidance=None):
        SlowGenerator.running = True
        try:
            x = torch.zeros(len(conditions), 8)
            for _ in range(int(num_steps)):
                x = x + 0.01 * self.net(x)  # the forward's pre-hook is where a cancelled request stops
                SlowGenerator.steps_done += 1
                time.sleep(STEP_S)
            out = []
            for c, s in zip(conditions, seeds, strict=True):
                g = torch.Generator().manual_seed(int(s))
                out.append(torch.sigmoid(torch.randn(3, 32, 32, generator=g) + int(c) / 10 + float(x.mean())))
            return torch.stack(out)
        finally:
            SlowGenerator.running = False


@pytest.fixture
def families(monkeypatch):
    from distill_common import generator_folder

    loaders = {"test_noise": SimpleNamespace(load=lambda: NoiseGenerator),
               "test_slow": SimpleNamespace(load=lambda: SlowGenerator)}
    monkeypatch.setattr(generator_folder, "generator_loaders", lambda: loaders)
    SlowGenerator.steps_done = 0


def served_model(tmp_path: Path, family: str):
    """Log a generator folder of ``family`` as a pyfunc model, download and check it, and load it for serving
    (what `distill registry serve` and its child do)."""
    from distill_common import tracking
    from distill_common.generator import write_generator_manifest

    folder = tmp_path / f"gen-{family}"
    write_generator_manifest(folder, family, scale=1.0)
    with tracking.start_run("serve-cancel", family) as run:
        uri = tracking.log_generator_model(run, folder)
    local = tracking.fetch_servable_model(uri, tmp_path / f"served-{family}")
    return tracking.load_served_model(local)


class Running:
    """An ASGI app served by uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, app, server=None):
        from distill_common.serving import make_server

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = server or make_server(app, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def request(self, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, str, str]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode(), r.headers.get("content-type")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), exc.headers.get("content-type")


def rows(data: list[list], columns=("condition", "seed", "steps")) -> dict:
    return {"dataframe_split": {"columns": list(columns), "data": data}}


@pytest.fixture
def module_hook():
    cancel.install_module_hook()
    yield
    cancel.remove_module_hook()


def wait_until(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_a_request_stops_computing_when_its_client_disconnects(mlflow_uri, tmp_path, families, module_hook, caplog):
    from distill_common.serving import build_app

    model = served_model(tmp_path, "test_slow")
    with Running(build_app(model, timeout_s=None)) as srv, caplog.at_level(logging.WARNING, "distill.serve"):
        body = json.dumps(rows([[3, 0, 200]])).encode()
        client = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        client.sendall(b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: SlowGenerator.steps_done >= 5, timeout=20)  # sampling has started
        client.close()  # the client goes away, as one that timed out does
        at_close = SlowGenerator.steps_done
        stopped_after = wait_until(lambda: not SlowGenerator.running, timeout=2.0)
        left = SlowGenerator.steps_done
        time.sleep(0.5)
        assert SlowGenerator.steps_done == left, "the worker kept sampling after it was cancelled"
        assert left < 200 and left - at_close <= (stopped_after + 0.3) / STEP_S, (at_close, left, stopped_after)
        lines = wait_until(lambda: any("cancelled" in r.getMessage() for r in caplog.records), timeout=2.0)
        assert lines is not None
        logged = [r.getMessage() for r in caplog.records if "cancelled" in r.getMessage()]
        assert len(logged) == 1 and "the client disconnected" in logged[0] and "\n" not in logged[0]
        # the model is free again: the next request is answered at once
        SlowGenerator.steps_done = 0
        status, body, _ = srv.request("/invocations", rows([[1, 0, 2]]))
        assert status == 200 and SlowGenerator.steps_done == 2, body


def test_a_request_past_its_time_limit_is_cancelled_with_a_one_line_503(mlflow_uri, tmp_path, families, module_hook,
                                                                        monkeypatch):
    from distill_common import serving

    monkeypatch.setenv(serving.REQUEST_TIMEOUT_ENV, "1")
    model = served_model(tmp_path, "test_slow")
    status, body, _ = model.invoke(json.dumps(rows([[3, 0, 4]])).encode(), "application/json")  # first-call costs
    assert status == 200 and len(json.loads(body)["predictions"]) == 1 and SlowGenerator.steps_done == 4
    SlowGenerator.steps_done = 0
    with Running(serving.build_app(model, timeout_s=serving.request_timeout())) as srv:
        start = time.monotonic()
        status, body, ctype = srv.request("/invocations", rows([[3, 0, 200]]))  # 4 s of sampling
        elapsed = time.monotonic() - start
        assert status == 503 and ctype == "application/json", body
        payload = json.loads(body)
        assert set(payload) == {"error_code", "message"} and "\n" not in payload["message"]
        assert "limit of 1 s per request" in payload["message"] and "--request-timeout" in payload["message"]
        assert elapsed < 3.0 and not SlowGenerator.running  # answered once the worker had stopped
        assert 0 < SlowGenerator.steps_done < 150, SlowGenerator.steps_done
        done = SlowGenerator.steps_done
        time.sleep(0.3)
        assert SlowGenerator.steps_done == done


def test_stopping_the_server_cancels_the_request_in_flight(mlflow_uri, tmp_path, families, module_hook):
    import signal

    from distill_common.serving import build_app

    model = served_model(tmp_path, "test_slow")
    srv = Running(build_app(model, timeout_s=None))
    with srv:
        got = {}
        worker = threading.Thread(target=lambda: got.update(r=srv.request("/invocations", rows([[3, 0, 200]]))))
        worker.start()
        wait_until(lambda: SlowGenerator.steps_done >= 3, timeout=20)
        srv.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does in the serve child
        wait_until(lambda: not SlowGenerator.running, timeout=2.0)
        worker.join(timeout=10)
    assert SlowGenerator.steps_done < 200
    status, body, _ = got["r"]
    assert status == 503 and "the server is stopping" in json.loads(body)["message"], body


def test_answers_are_the_same_as_mlflows_scoring_server(mlflow_uri, tmp_path, families, module_hook):
    """Clients see no change: routes, bodies, status codes and media types as MLflow's own scoring server."""
    from mlflow.pyfunc import scoring_server

    from distill_common.serving import build_app

    model = served_model(tmp_path, "test_noise")
    requests = [("/ping", None), ("/health", None), ("/version", None),
                ("/invocations", rows([[3, 0, 2], [5, 1, 2]])),
                ("/invocations", {"dataframe_records": [{"condition": 7, "seed": 4}]}),
                ("/invocations", {"inputs": {"condition": [2], "seed": [9]}, "params": {"steps": 3}}),
                ("/invocations", rows([[3, 0, -1]])),  # one-line 400s, as before
                ("/invocations", rows([[0, 0, 1_000_000_000]])),
                ("/invocations", {"dataframe_split": {"columns": ["condition"], "data": [[0]] * 65}})]
    with Running(build_app(model)) as ours, Running(scoring_server.init(model.model)) as mlflows:
        for path, body in requests:
            mine, theirs = ours.request(path, body), mlflows.request(path, body)
            assert mine == theirs, (path, body, mine[:2], theirs[:2])
        status, body, _ = ours.request("/invocations", rows([[3, 0, 2]]))
        assert status == 200 and json.loads(body)["predictions"][0]["image"]


def test_an_rf_cifar_sampler_stops_at_the_forward_after_the_cancel(module_hook):
    """The real rf_cifar sampling loop stops at the network forward right after its token is set."""
    pytest.importorskip("distill_rf_cifar")
    from distill_rf_cifar.config import UNetConfig
    from distill_rf_cifar.generator import RFGenerator
    from distill_rf_cifar.models.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet(UNetConfig(base_channels=8, channel_mults=[1, 2], res_blocks=1, attention_resolutions=[],
                                 mid_attention=False, dropout=0.0, norm_groups=8)).eval()
    gen = RFGenerator(unet, default_steps=2)
    token, calls = cancel.CancelToken(), []

    def count(module, args, out):
        calls.append(1)
        if len(calls) == 5:
            token.cancel("test")

    handle = unet.register_forward_hook(count)
    try:
        with cancel.cancellable(token), pytest.raises(cancel.Cancelled, match="test"):
            gen.generate([1, 2], 200, [0, 1])
        assert len(calls) == 5  # the sixth forward never ran
        calls.clear()
        assert gen.generate([1], 3, [0]).shape == (1, 3, 32, 32)  # outside a request nothing is checked
        assert len(calls) == 3
    finally:
        handle.remove()
