"""``distill ui``: a Streamlit page to try registered teachers and students side by side.

:func:`streamlit_command` builds the ``streamlit run`` command line for :data:`PAGE`; :func:`serve` runs it
with the tracking URI passed through the environment, so the page reads the same registry as the CLI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PAGE = Path(__file__).with_name("page.py")


def streamlit_command(host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(PAGE), "--server.port", str(port),
            "--server.address", host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]


def page_environment() -> dict[str, str]:
    """The caller's environment with ``MLFLOW_TRACKING_URI`` resolved (the embedded ./mlflow.db by default)."""
    from distill_common import tracking

    return dict(os.environ, MLFLOW_TRACKING_URI=tracking.tracking_uri())


def serve(host: str = "127.0.0.1", port: int = 8501) -> int:
    """Run the page until streamlit exits or SIGTERM/SIGINT arrives (forwarded to streamlit's process group,
    so nothing keeps listening); returns streamlit's exit code, 0 when stopped by a signal."""
    import importlib.util

    from distill_common import tracking
    from distill_common.errors import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port; pass a number from 1 to 65535 (default 8501)")
    if importlib.util.find_spec("streamlit") is None:
        raise ConfigError("streamlit is not installed; run 'make setup' (or pip install -c constraints.txt streamlit)")
    env = page_environment()
    tracking.check_reachable(env["MLFLOW_TRACKING_URI"])
    print(f"distill ui: http://{host}:{port}  (registry {env['MLFLOW_TRACKING_URI']}; Ctrl-C stops it)", flush=True)
    from distill_common.foreground import run_foreground

    return run_foreground(streamlit_command(host, port), env)
