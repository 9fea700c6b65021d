"""Read back what a run logged: its start time, the list of its artifact files, and local copies of them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from distill_common.errors import TrackingError
from distill_common.tracking.run import configure


def download_run_artifacts(run_id: str, path: str = "", dst: str | Path | None = None) -> Path:
    """Download ``path`` (a file or folder, ``""`` for all) of run ``run_id``; returns the local copy."""
    from mlflow.artifacts import download_artifacts

    configure()
    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="distill-run-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        return Path(download_artifacts(run_id=run_id, artifact_path=path or None, dst_path=str(target)))
    except Exception as exc:
        raise TrackingError(f"cannot download artifacts {path or '(all)'!r} of run {run_id}: {exc}; "
                            "check the run still exists in the tracking store") from None


def list_run_artifacts(run_id: str, path: str = "") -> list[str]:
    """Paths of every file under ``path`` of run ``run_id`` (recursive, relative to the run's artifact root)."""
    from mlflow import MlflowClient

    configure()
    client, files, folders = MlflowClient(), [], [path or None]
    try:
        while folders:
            for entry in client.list_artifacts(run_id, folders.pop()):
                (folders if entry.is_dir else files).append(entry.path)
    except Exception as exc:
        raise TrackingError(f"cannot list the artifacts of run {run_id}: {exc}; check the run still exists") from None
    return sorted(files)


def run_start_time(run_id: str) -> float | None:
    """Start time of a run in seconds since the epoch, or None when the run is gone."""
    from mlflow import MlflowClient

    configure()
    try:
        return MlflowClient().get_run(run_id).info.start_time / 1000.0
    except Exception:
        return None
