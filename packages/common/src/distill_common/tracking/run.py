"""MLflow run tracking: the embedded sqlite default, a reachability check, and the run context.

Only this package imports mlflow. Training loops report numbers through a returned dict or a
callback; the CLI layer hands them to :class:`TrackingRun`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill_common.errors import TrackingError

# MLflow's own tqdm bars for artifact up/downloads interleave with our rich progress; ours say what is happening
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_DB_NAME = "mlflow.db"
UNLOGGED_FILE = "unlogged_metrics.jsonl"
KEPT_DIR = "unlogged_artifacts"  # copies (hard links where possible) of artifacts waiting for relog
DEFAULT_ARTIFACT_DIR = "mlartifacts"
MAX_PARAM_LENGTH = 6000


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else an embedded sqlite store in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_DB_NAME}"


@contextmanager
def using_store(uri: str | None) -> Iterator[str]:
    """Within the block, :func:`tracking_uri` is ``uri`` (a command's ``--tracking-uri``); None keeps
    ``MLFLOW_TRACKING_URI`` or ./mlflow.db. The environment is restored afterwards."""
    if not uri:
        yield tracking_uri()
        return
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def artifact_root() -> str:
    """Where new experiments keep artifacts for the embedded store (``DISTILL_ARTIFACT_ROOT`` overrides)."""
    root = os.environ.get("DISTILL_ARTIFACT_ROOT") or str(Path.cwd() / DEFAULT_ARTIFACT_DIR)
    return Path(root).resolve().as_uri()


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any training when a tracking server does not answer (one line, with the fix)."""
    if not is_remote(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's own server
            if resp.status >= 400:
                raise TrackingError(f"MLflow server {uri} answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}); start it "
            "(tools/mlflow_server.sh) or unset MLFLOW_TRACKING_URI to use the local store"
        ) from None


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_sqlite_file(uri: str) -> None:
    """A local sqlite store that exists must be an SQLite file: a corrupt or foreign file is one line, not an
    SQLAlchemy traceback (an empty file is what sqlite creates, and is fine)."""
    db = _sqlite_path(uri)
    if db is None or not db.is_file():
        return
    try:
        with open(db, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError:
        return  # unreadable: check_store_writable and mlflow name that
    if head and head != SQLITE_MAGIC:
        raise TrackingError(f"the MLflow store {db} is not an SQLite database (corrupt, or another file); move it "
                            f"away (mv {db} {db}.bad) to start a new store, or point MLFLOW_TRACKING_URI at the "
                            "right one")


def check_store_writable(uri: str | None = None) -> None:
    """Fail in well under a second when the embedded store cannot be written (mlflow itself would retry for
    about two minutes): the sqlite file's folder and the artifact root must take a new file. A server is
    checked for reachability instead."""
    from distill_common.errors import os_error_text

    uri = uri or tracking_uri()
    if is_remote(uri):
        check_reachable(uri)
        return
    check_sqlite_file(uri)
    targets: list[tuple[Path, str]] = []
    db = _sqlite_path(uri)
    if db is not None:
        targets.append((db.parent, f"the MLflow store {db}"))
    elif uri.startswith("file:") or "://" not in uri:
        targets.append((Path(uri.removeprefix("file://").removeprefix("file:")), f"the MLflow store {uri}"))
    art = os.environ.get("DISTILL_ARTIFACT_ROOT") or str(Path.cwd() / DEFAULT_ARTIFACT_DIR)
    targets.append((Path(art), f"the MLflow artifact folder {art}"))
    fix = ("run from a writable folder, or set MLFLOW_TRACKING_URI=sqlite:////writable/path/mlflow.db and "
           "DISTILL_ARTIFACT_ROOT, or pass --no-track")
    for folder, what in targets:
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        try:
            if existing is not None and not existing.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(existing))
            probe_dir = folder if folder.is_dir() else existing
            fd, probe = tempfile.mkstemp(prefix=".distill-write-check-", dir=probe_dir)
            os.close(fd)
            os.unlink(probe)
            if folder == (db.parent if db is not None else None) and db.exists() and not os.access(db, os.W_OK):
                raise PermissionError(13, "Permission denied", str(db))
        except OSError as exc:
            raise TrackingError(f"{what} is not writable ({os_error_text(exc)}: {exc.filename or folder}); {fix}") from None


def configure(uri: str | None = None) -> str:
    """Point mlflow at the chosen store after checking that it can be reached; return the URI."""
    import mlflow

    uri = uri or tracking_uri()
    check_reachable(uri)
    check_sqlite_file(uri)
    if is_remote(uri):  # a server that dies mid-run must cost seconds, not minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # always: a registry URI left by an earlier store must not linger
    return uri


def get_or_create_experiment(name: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs = {} if is_remote(mlflow.get_tracking_uri()) else {"artifact_location": f"{artifact_root()}/{name}"}
    try:
        return mlflow.create_experiment(name, **kwargs)
    except Exception:  # created concurrently by another process
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def workspace_tags() -> dict[str, str]:
    """Versions of the five packages, git commit, and device / torch / CUDA versions."""
    from distill_common.runtime import environment_info
    from distill_common.versions import package_versions

    tags = {f"version.{k}": v for k, v in package_versions().items()}
    tags["git_commit"] = git_commit(Path(__file__).resolve().parent)
    tags.update({f"env.{k}": v for k, v in environment_info().items()})
    return tags


def _to_png_bytes(image: Any) -> bytes:
    """PIL image, (H,W,3) uint8 array or (3,H,W) float tensor in [0,1] → PNG bytes."""
    from PIL import Image

    if hasattr(image, "save"):
        pil = image
    else:
        arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


class TrackingRun:
    """One MLflow run. Logging never kills training: a failed call is written to
    ``<fallback_dir>/unlogged_metrics.jsonl`` and reported at the end with the command that re-logs it.
    """

    def __init__(self, run_id: str | None, fallback_dir: Path | None, enabled: bool = True):
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self.fallback_dir = Path(fallback_dir) if fallback_dir else None
        self.failed_calls = 0
        self.degraded = False  # after a failure, values go straight to the fallback file
        self._client = None

    # -- internals --------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient()
        return self._client

    @property
    def unlogged_path(self) -> Path | None:
        return self.fallback_dir / UNLOGGED_FILE if self.fallback_dir else None

    def _keep(self, path: str) -> str:
        """Copy a file or folder into the output dir's kept-artifacts folder (it may be pruned or be a temp file);
        files are hard-linked where the file system allows (checkpoints are written by rename, never in place)."""
        src = Path(path)
        if self.fallback_dir is None or not src.exists():
            return path
        kept = self.fallback_dir / KEPT_DIR
        kept.mkdir(parents=True, exist_ok=True)
        slot = kept / f"{max((int(p.name) for p in kept.iterdir() if p.name.isdigit()), default=-1) + 1:05d}"
        dst = slot / src.name  # same name: it is uploaded under the name it would have had
        slot.mkdir()
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst))
        return str(dst.resolve())

    def _guard(self, kind: str, payload: Mapping[str, Any], fn, *args, keep: str | None = None, **kwargs) -> None:
        if not self.enabled:
            return
        try:
            if self.degraded:
                raise ConnectionError("the tracking store failed earlier in this run")
            fn(*args, **kwargs)
        except Exception as exc:  # server down, disk full, ...: keep training, keep the numbers
            self.failed_calls += 1
            self.degraded = True
            if self.failed_calls == 1:
                warnings.warn(f"MLflow logging failed ({type(exc).__name__}: {exc}); keeping values on disk", stacklevel=3)
            if self.unlogged_path is not None:
                record = {"run_id": self.run_id, "kind": kind, "time": time.time(), **payload}
                if keep is not None:
                    try:
                        record[keep] = self._keep(record[keep])
                    except OSError as keep_exc:  # no space to keep a copy: say so in the record, keep training
                        record["keep_error"] = f"{type(keep_exc).__name__}: {keep_exc}"
                self.unlogged_path.parent.mkdir(parents=True, exist_ok=True)
                with self.unlogged_path.open("a") as f:
                    f.write(json.dumps(record, default=str) + "\n")

    # -- logging ----------------------------------------------------------------------------
    def record_failure(self, kind: str, payload: Mapping[str, Any], exc: Exception, keep: str | None = None) -> None:
        """Note a failed call made outside :meth:`_guard` (e.g. model logging) in the fallback file; ``keep``
        names the payload key of a path to keep a copy of until it is relogged."""
        self._guard(kind, payload, lambda: (_ for _ in ()).throw(exc), keep=keep)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._guard("params", {"params": {p.key: p.value for p in chunk}},
                        self.client.log_batch, self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        if items:
            self._guard("metrics", {"metrics": {m.key: m.value for m in items}, "step": int(step or 0)},
                        self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        if items:
            self._guard("tags", {"tags": {t.key: t.value for t in items}}, self.client.log_batch, self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        p = Path(path)
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        self._guard("artifact", {"path": str(p.resolve()), "artifact_path": artifact_path},
                    fn, self.run_id, str(p), artifact_path, keep="path")

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if not self.enabled:
            return
        self._guard("dict", {"artifact_file": artifact_file, "data": dict(data)},
                    self.client.log_dict, self.run_id, dict(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        self._guard("text", {"artifact_file": artifact_file, "text": text}, self.client.log_text, self.run_id, text,
                    artifact_file)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image, array or (3,H,W) tensor in [0,1] as a PNG artifact."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(artifact_file).name
            target.write_bytes(_to_png_bytes(image))
            parent = str(Path(artifact_file).parent)
            self.log_artifact(target, None if parent == "." else parent)

    def log_config(self, cfg: Any, artifact_file: str = "config.yaml") -> None:
        """Flattened params plus the resolved config file as an artifact."""
        from distill_common.config import flatten, format_config

        self.log_params(flatten(cfg))
        self.log_text(format_config(cfg), artifact_file)

    def report_failures(self) -> str | None:
        """A message naming what could not be logged and how to re-log it, or None."""
        if not self.failed_calls:
            return None
        return (
            f"{self.failed_calls} MLflow logging call(s) failed; the values are in {self.unlogged_path}. "
            f"Re-log them with: distill registry relog {self.unlogged_path}"
        )


def run_link(experiment_id: str, run_id: str) -> str:
    """Where a run is seen: its page on the tracking server, or for a local store the page ``mlflow ui`` serves
    (started with the command that follows)."""
    uri = tracking_uri()
    if is_remote(uri):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return (f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id} "
            f"(after: mlflow ui --backend-store-uri {uri} --port 5000)")


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    *,
    config: Any = None,
    tags: Mapping[str, Any] | None = None,
    fallback_dir: str | Path | None = None,
    enabled: bool = True,
    run_id: str | None = None,
    nested: bool = False,
) -> Iterator[TrackingRun]:
    """Open (or resume, with ``run_id``) an MLflow run that logs the config, versions and environment.

    With ``enabled=False``, and on every process but the main one of a distributed launch, no store is
    touched and every logging call is a no-op.
    """
    from distill_common.runtime import is_main_process

    if not enabled or not is_main_process():
        yield TrackingRun(None, fallback_dir, enabled=False)
        return
    import mlflow

    if not is_remote(tracking_uri()):
        check_store_writable()  # seconds of sqlite retries otherwise
    configure()
    experiment_id = get_or_create_experiment(experiment)
    active = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id,
                              run_name=None if run_id else run_name, nested=nested)
    run = TrackingRun(active.info.run_id, fallback_dir)
    if not nested:  # one line to follow the run live (its curves fill in while it trains)
        from rich.console import Console

        Console(stderr=True).print(f"MLflow run {run_name or run.run_id}: {run_link(experiment_id, run.run_id)}",
                                   highlight=False, soft_wrap=True)
    status = "FINISHED"
    try:
        if run_id is None:
            run.set_tags({**workspace_tags(), **(tags or {})})
            if config is not None:
                run.log_config(config)
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            mlflow.end_run(status=status)
        except Exception as exc:  # the server may be gone: the run's data is on disk already
            warnings.warn(f"could not close MLflow run {run.run_id}: {exc}", stacklevel=2)
        msg = run.report_failures()
        if msg:
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


@dataclass
class RelogReport:
    """What ``relog`` sent, and each record it could not send with the reason (line number, what, why)."""

    sent: int = 0
    dropped: list[tuple[int, str, str]] = field(default_factory=list)
    remaining_file: Path | None = None  # the fallback file, rewritten to hold only what was not sent


def _describe(rec: Mapping[str, Any]) -> str:
    kind = rec.get("kind", "?")
    if kind == "metrics":
        return f"metrics {', '.join(rec.get('metrics', {}))} at step {rec.get('step')}"
    if kind in ("params", "tags"):
        return f"{kind} {', '.join(rec.get(kind, {}))}"
    if kind == "artifact":
        return f"artifact {rec.get('path')}"
    if kind == "model":
        return f"model {rec.get('generator_dir')}"
    if kind in ("dict", "text"):
        return f"{kind} artifact {rec.get('artifact_file')}"
    return f"record of kind {kind!r}"


def _send(client, rec: Mapping[str, Any]) -> str | None:
    """Send one record; returns None when sent, else why it cannot be sent (tracking-store errors raise)."""
    from mlflow.entities import Metric, Param, RunTag

    kind, run_id = rec["kind"], rec["run_id"]
    ts = int(rec["time"] * 1000)
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, ts, rec["step"]) for k, v in rec["metrics"].items()])
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in rec["params"].items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
    elif kind == "model":
        if not Path(rec["generator_dir"]).is_dir():
            return f"the generator folder {rec['generator_dir']} is gone"
        from distill_common.tracking.model_log import log_model_now

        log_model_now(run_id, rec["generator_dir"], rec.get("name", "generator"))
    elif kind == "artifact":
        p = Path(rec["path"])
        if not p.exists():
            return f"the file {p} is gone"
        (client.log_artifacts if p.is_dir() else client.log_artifact)(run_id, str(p), rec["artifact_path"])
    elif kind == "dict" and "data" in rec:
        client.log_dict(run_id, rec["data"], rec["artifact_file"])
    elif kind == "text" and "text" in rec:
        client.log_text(run_id, rec["text"], rec["artifact_file"])
    elif kind in ("dict", "text"):
        return "the record holds no content (written by an older version)"
    else:
        return f"unknown record kind {kind!r}"
    return None


def relog(path: str | Path) -> RelogReport:
    """Replay an ``unlogged_metrics.jsonl`` file into the store.

    Every record that cannot be sent is reported with its reason and stays in the file (rewritten to hold
    only those), so a later relog retries just them; kept artifact copies are removed once sent. When all
    was sent, the file is removed.
    """
    from mlflow import MlflowClient

    from distill_common.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the unlogged_metrics.jsonl a run printed (in its output dir)")
    configure()
    client = MlflowClient()
    report = RelogReport()
    remaining: list[str] = []
    sent_kept: list[Path] = []
    kept_root = (path.parent / KEPT_DIR).resolve()
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not {"kind", "run_id", "time"} <= set(rec):
                raise ValueError("missing kind/run_id/time")
        except ValueError as exc:
            report.dropped.append((lineno, "unreadable line", f"not a relog record ({exc})"))
            remaining.append(line)
            continue
        try:
            why = _send(client, rec)
        except Exception as exc:  # the store refused it (deleted run, server error): report, keep for a retry
            why = f"the tracking store refused it ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]})"
        if why is not None:
            report.dropped.append((lineno, _describe(rec), why))
            remaining.append(line)
            continue
        report.sent += 1
        for key in ("path", "generator_dir"):
            if key in rec and Path(rec[key]).resolve().is_relative_to(kept_root):
                sent_kept.append(Path(rec[key]))
    for p in sent_kept:  # sent: the kept copies (one numbered slot each) are no longer needed
        slot = p.resolve().parent
        shutil.rmtree(slot if slot.parent == kept_root else p, ignore_errors=True)
    if remaining:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("\n".join(remaining) + "\n")
        tmp.replace(path)
        report.remaining_file = path
    else:
        path.unlink()
        if kept_root.is_dir() and not any(kept_root.iterdir()):
            kept_root.rmdir()
    return report
