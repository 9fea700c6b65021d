"""The REST server of ``distill registry serve``: MLflow's scoring routes and formats, and requests that stop when
their client goes away or their time runs out.

MLflow's own scoring server runs the model in a thread that nothing stops: a client that gave up (or got MLflow's
504 after its time limit) left its prediction computing to the end. Here each request runs in a worker thread
under a :class:`~distill_common.cancel.CancelToken`. While it runs, the request's coroutine polls the connection
(``request.is_disconnected()``) and the clock, and sets the token when the client has gone, when
``--request-timeout`` has passed, or when the server is told to stop. Sampling stops at its next network forward
(:mod:`distill_common.cancel`), the worker frees the CPU, the server logs one line and answers with MLflow's
one-line JSON error: 499 (client closed the request), 503 (time limit, server stopping).

The model is shared and one prediction already uses every core, so one runs at a time; the others wait, and are
cancelled the same way while they wait. The model is loaded once, through the tracking layer, which runs MLflow's
own ``/invocations`` handler on it: the same input formats, the same output, the same errors as before.

Routes, as MLflow's: ``POST /invocations``, ``GET /ping``, ``GET /health``, ``GET /version``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from distill_common.cancel import Cancelled, CancelToken, cancellable, install_module_hook

if TYPE_CHECKING:  # the serve command reads this module's constants without loading the web stack
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

REQUEST_TIMEOUT_ENV = "DISTILL_SERVE_REQUEST_TIMEOUT"  # set by `distill registry serve --request-timeout`
DEFAULT_REQUEST_TIMEOUT_S = 60.0  # MLflow's scoring server's own limit (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)
POLL_S = 0.1  # how often a running request looks at its connection and its clock
CLIENT_CLOSED = 499  # "client closed request"; nobody reads it, but the access log shows it
CLIENT_GONE = "the client disconnected"
STOPPING = "the server is stopping"
JSON = "application/json"
_log = logging.getLogger("distill.serve")


class Invoker(Protocol):
    """What the server serves: :class:`distill_common.tracking.pyfunc.ServedModel`, or a test's stand-in."""

    version: str

    def invoke(self, body: bytes, content_type: str) -> tuple[int, str, str]: ...


def request_timeout() -> float:
    """Seconds one request may run: the serve command's ``--request-timeout`` (environment), else the default."""
    try:
        value = float(os.environ.get(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT_S))
    except ValueError:
        return DEFAULT_REQUEST_TIMEOUT_S
    return value if value > 0 and value == value and value != float("inf") else DEFAULT_REQUEST_TIMEOUT_S


def _error(status: int, code: str, message: str) -> Response:
    from starlette.responses import Response

    return Response(json.dumps({"error_code": code, "message": message}), status_code=status, media_type=JSON)


def build_app(model: Invoker, timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S, poll_s: float = POLL_S) -> Starlette:
    """The ASGI app serving ``model``; ``timeout_s`` None means no time limit. ``app.state.cancel_all(reason)``
    cancels every request in flight (the server calls it when it is told to stop)."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    lock = threading.Lock()  # one prediction at a time
    active: set[CancelToken] = set()

    def run(token: CancelToken, body: bytes, content_type: str) -> tuple[int, str, str]:
        with cancellable(token):
            while not lock.acquire(timeout=poll_s):  # waiting for the model, still cancellable
                token.raise_if_cancelled()
            try:
                token.raise_if_cancelled()
                return model.invoke(body, content_type)
            finally:
                lock.release()

    async def ping(request: Request) -> Response:
        return Response("\n", status_code=200, media_type=JSON)

    async def version(request: Request) -> Response:
        return Response(model.version, status_code=200, media_type=JSON)

    async def invocations(request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:  # gone before its request arrived whole: nothing was computed
            return _error(CLIENT_CLOSED, "CANCELLED", f"request cancelled: {CLIENT_GONE}")
        content_type = request.headers.get("content-type", "")
        token, started = CancelToken(), time.monotonic()
        active.add(token)
        work = asyncio.ensure_future(asyncio.to_thread(run, token, body, content_type))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=poll_s)
                if work.done() or token.cancelled:
                    continue  # a cancelled worker stops at its next forward; its answer is awaited
                if await request.is_disconnected():
                    token.cancel(CLIENT_GONE)
                elif timeout_s is not None and time.monotonic() - started > timeout_s:
                    token.cancel(f"it ran past this server's limit of {timeout_s:g} s per request")
        except asyncio.CancelledError:  # the server gave up on this request: stop its worker too
            token.cancel(STOPPING)
            raise
        finally:
            active.discard(token)
        elapsed = time.monotonic() - started
        try:
            status, content, media_type = work.result()
        except Cancelled as exc:
            _log.warning("request cancelled after %.1f s: %s", elapsed, exc.reason)
            if exc.reason == CLIENT_GONE:
                return _error(CLIENT_CLOSED, "CANCELLED", f"request cancelled after {elapsed:.1f} s: {exc.reason}")
            if exc.reason == STOPPING:
                return _error(503, "TEMPORARILY_UNAVAILABLE", f"request cancelled: {STOPPING}; send it again "
                                                              "when the server is back")
            return _error(503, "DEADLINE_EXCEEDED", f"request cancelled: {exc.reason}; ask for fewer rows or "
                                                    "steps (or start the server with a larger --request-timeout)")
        except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
            _log.exception("request failed")
            return _error(500, "INTERNAL_ERROR", f"request failed ({type(exc).__name__}); see the server log")
        return Response(content, status_code=status, media_type=media_type)

    def cancel_all(reason: str = STOPPING) -> None:
        for token in list(active):
            token.cancel(reason)

    app = Starlette(routes=[Route("/ping", ping), Route("/health", ping), Route("/version", version),
                            Route("/invocations", invocations, methods=["POST"])])
    app.state.cancel_all = cancel_all
    return app


def make_server(app: Starlette, host: str, port: int, **config: Any):
    """A uvicorn server for ``app`` whose SIGTERM/SIGINT also cancel the requests in flight, so stopping never
    waits for a prediction to finish."""
    import uvicorn

    class CancellingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 - uvicorn's signature
            app.state.cancel_all(STOPPING)
            super().handle_exit(sig, frame)

    config.setdefault("timeout_graceful_shutdown", 5)
    return CancellingServer(uvicorn.Config(app, host=host, port=port, workers=1, **config))


def main(argv: list[str] | None = None) -> int:
    """``python -m distill_common.serving MODEL_DIR HOST PORT``: the child ``distill registry serve`` starts once
    it has downloaded and checked the model. The limits come in the environment (``DISTILL_SERVE_MAX_STEPS``,
    ``DISTILL_SERVE_MAX_ROWS``, ``DISTILL_SERVE_REQUEST_TIMEOUT``)."""
    import sys

    from distill_common import tracking
    from distill_common.errors import DistillError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m distill_common.serving MODEL_DIR HOST PORT (started by 'distill registry serve')",
              file=sys.stderr)
        return 2
    model_dir, host, port = args
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    try:
        model = tracking.load_served_model(model_dir)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    install_module_hook()
    make_server(build_app(model, request_timeout()), host, int(port)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
