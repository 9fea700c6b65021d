"""Cooperative cancellation of one generation, for the model server (``distill registry serve``).

The server runs each request's prediction in a worker thread inside :func:`cancellable` with its own
:class:`CancelToken`; a watcher sets the token when the client disconnects, the request's time limit passes or
the server stops. Python cannot stop a thread from outside, so the sampling code stops itself: :func:`check`
raises :class:`Cancelled` once the token is set. It is called

- by a global torch forward pre-hook (:func:`install_module_hook`, installed by the server): every network
  forward of every family (the rf_cifar UNet at each ODE step, the Stable Diffusion UNet, text encoder and VAE
  inside diffusers pipelines) checks first, so a cancelled request stops within one forward;
- by the pyfunc model before it starts generating (a request that waited for the model and was cancelled
  meanwhile never starts).

Outside :func:`cancellable` (training, benchmarks, the CLI) :func:`check` is a no-op.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any


class Cancelled(BaseException):  # noqa: N818 - named like asyncio.CancelledError, which it mirrors
    """Raised inside a generation whose request was cancelled; ``reason`` says why, in a few words.

    A BaseException, like ``asyncio.CancelledError``: a sampler's (or MLflow's scoring code's)
    ``except Exception`` must not turn a cancellation into an ordinary error and carry on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CancelToken:
    """Set once, from any thread; the first reason given is kept."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if not self._event.is_set():
                self.reason = reason
                self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason or "cancelled")


_current: ContextVar[CancelToken | None] = ContextVar("distill_cancel_token", default=None)
_hook: Any = None


@contextmanager
def cancellable(token: CancelToken) -> Iterator[CancelToken]:
    """Run the enclosed code (in this thread or task) under ``token``: :func:`check` raises once it is set."""
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)


def check() -> None:
    """Raise :class:`Cancelled` when the current request's token is set; a no-op outside :func:`cancellable`."""
    token = _current.get()
    if token is not None:
        token.raise_if_cancelled()


def _before_forward(module: Any, args: Any) -> None:
    check()


def install_module_hook() -> None:
    """Make every torch module's forward call :func:`check` first (once per process; the model server's)."""
    global _hook
    if _hook is None:
        from torch.nn.modules.module import register_module_forward_pre_hook

        _hook = register_module_forward_pre_hook(_before_forward)


def remove_module_hook() -> None:
    """Undo :func:`install_module_hook` (tests, or an in-process server that stops)."""
    global _hook
    if _hook is not None:
        _hook.remove()
        _hook = None
