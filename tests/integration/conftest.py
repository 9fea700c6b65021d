"""Fixtures of the integration tests: a real MLflow tracking server on a free loopback port, stopped by PID."""

from __future__ import annotations

import pytest
from server_fixtures import free_port, start_server, stop_pid


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """Yields (uri, pid, state_dir); MLFLOW_TRACKING_URI points at the server for the test."""
    port = free_port()
    state = tmp_path / "server"
    pid = start_server(state, port)
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        yield uri, pid, state
    finally:
        stop_pid(pid)
