"""Generators as MLflow pyfunc models: ``mlflow.pyfunc.load_model("models:/NAME@champion")`` generates images.

Generators are logged as models from code (this package's ``pyfunc_entry.py``), and only such models are
accepted back: :func:`verify_logged_generator` reads a downloaded model's files (it imports and unpickles
nothing) and refuses any other pyfunc, e.g. a cloudpickled ``python_model`` that would run code on load.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR

from distill_common.errors import DistillError, ModelLoadError
from distill_common.tracking.model_log import ARTIFACT_KEY, ENTRY_FILE, log_model_now  # noqa: F401 (re-exported)
from distill_common.tracking.run import TrackingRun, configure

CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
INPUT_COLUMNS = ("condition", "seed", "steps", "guidance")
MAX_REASON = 300  # characters of a refusal: a reply never echoes a large request back
# What one request may cost, set by `distill registry serve --max-steps/--max-rows` for the model server it starts
MAX_STEPS_ENV, MAX_ROWS_ENV = "DISTILL_SERVE_MAX_STEPS", "DISTILL_SERVE_MAX_ROWS"
DEFAULT_MAX_STEPS, DEFAULT_MAX_ROWS = 200, 64


def request_limits() -> tuple[int, int]:
    """(max steps, max rows) of one request: the serve command's options (environment), else the safe defaults."""
    import os

    def read(name: str, default: int) -> int:
        try:
            value = int(os.environ.get(name, default))
        except ValueError:
            return default
        return value if value >= 1 else default

    return read(MAX_STEPS_ENV, DEFAULT_MAX_STEPS), read(MAX_ROWS_ENV, DEFAULT_MAX_ROWS)
_log = logging.getLogger(__name__)


class RequestError(MlflowException):
    """A refused request. The model server answers with this one line as its JSON ``message`` (HTTP 400 for
    bad input, 500 otherwise): no traceback, no file paths, no dump of the request."""

    def __init__(self, reason: str, error_code: int = BAD_REQUEST):
        reason = " ".join(str(reason).split())
        self.reason = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"  # never the whole body
        super().__init__(self.reason, error_code=error_code)

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


def _as_int(value: Any, what: str, minimum: int | None = None) -> int:
    try:
        number = float(value)
        ok = math.isfinite(number) and number == int(number)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise RequestError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and int(number) < minimum:
        raise RequestError(f"{what} must be at least {minimum}, got {int(number)}")
    return int(number)


def _one(values: list[Any], what: str) -> Any:
    distinct = {repr(v) for v in values}
    if len(distinct) > 1:
        raise RequestError(f"all rows must share one {what}, got {sorted(distinct)}; send one request per {what}")
    return values[0]


class GeneratorPyfunc(mlflow.pyfunc.PythonModel):
    """Input rows: ``condition`` (class label or prompt), optional ``seed``, ``steps``, ``guidance``.
    Output rows: the same plus ``image`` (PNG, base64). ``.generator`` is the loaded Generator.
    Bad input raises :class:`RequestError` (one line)."""

    # rows are validated by _parse (one-line RequestErrors), not by MLflow's type-hint checks, whose "add type
    # hints" warning otherwise prints at every import and every model logged
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from distill_common.generator_folder import load_generator_folder

        self.generator = load_generator_folder(context.artifacts[ARTIFACT_KEY], device="auto")

    def _parse(self, model_input, params: dict[str, Any] | None):
        import pandas as pd

        try:
            df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"input is not a table of rows ({exc})") from None
        unknown = [str(c) for c in df.columns if c not in INPUT_COLUMNS]
        if "condition" not in df.columns or unknown:
            raise RequestError(f"input columns must be {', '.join(INPUT_COLUMNS)} ('condition' required), "
                               f"got {', '.join(map(str, df.columns)) or 'none'}")
        if len(df) == 0:
            raise RequestError("input has no rows; send one row per image")
        max_steps, max_rows = request_limits()
        if len(df) > max_rows:
            raise RequestError(f"{len(df)} rows is over this server's limit of {max_rows} rows per request; send at "
                               f"most {max_rows} rows per request (the server's --max-rows)")
        params = params or {}
        raw_steps = _one(list(df["steps"]), "steps") if "steps" in df else params.get("steps", self.generator.default_steps)
        steps = _as_int(raw_steps, "steps", minimum=1)
        if steps > max_steps:
            raise RequestError(f"steps {steps} is over this server's limit of {max_steps}; pass steps from 1 to "
                               f"{max_steps} (the server's --max-steps)")
        guidance = _one(list(df["guidance"]), "guidance") if "guidance" in df else params.get("guidance")
        if guidance is not None:
            try:
                guidance = float(guidance)
            except (TypeError, ValueError):
                guidance = float("nan")
            if not math.isfinite(guidance) or guidance < 0:
                raise RequestError(f"guidance must be a finite number >= 0, got {guidance!r}")
        seeds = [_as_int(s, "seed", minimum=0) for s in df["seed"]] if "seed" in df else list(range(len(df)))
        conditions = list(df["condition"])
        if self.generator.condition_kind == "class":
            conditions = [_as_int(c, "class condition", minimum=0) for c in conditions]
            n = int(getattr(self.generator, "num_classes", 0) or 0)
            if n and max(conditions) >= n:
                raise RequestError(f"class condition must lie in 0..{n - 1}, got {max(conditions)}")
        elif not all(isinstance(c, str) and c.strip() for c in conditions):
            raise RequestError("every condition must be a non-empty prompt string")
        return df, conditions, steps, seeds, guidance

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        from PIL import Image

        from distill_common import cancel

        df, conditions, steps, seeds, guidance = self._parse(model_input, params)
        cancel.check()  # a request cancelled while it waited for the model never starts
        try:
            images = self.generator.generate(conditions, steps, seeds, guidance)
        except (DistillError, ValueError) as exc:  # the generator's own check of the input
            raise RequestError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except Exception as exc:
            _log.exception("generation failed")
            raise RequestError(f"generation failed ({type(exc).__name__}); see the server log",
                               error_code=INTERNAL_ERROR) from None
        encoded = []
        for img in images:  # (3, H, W) in [0, 1]
            arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return pd.DataFrame({"condition": df["condition"], "seed": seeds, "steps": steps, "image": encoded})


class ServedModel:
    """A loaded generator answering the MLflow scoring server's requests. :meth:`invoke` is MLflow's own
    ``/invocations`` handler (the same input formats: ``dataframe_split``, ``dataframe_records``, ``inputs``,
    ``instances``, CSV; the same ``{"predictions": [...]}`` out; the same JSON errors), so the server of
    ``distill registry serve`` (:mod:`distill_common.serving`) changes only how requests are run and cancelled."""

    def __init__(self, model: Any):
        from mlflow.version import VERSION

        self.model = model
        self.input_schema = model.metadata.get_input_schema()
        self.version = VERSION

    def invoke(self, body: bytes, content_type: str) -> tuple[int, str, str]:
        """(HTTP status, body, media type) of one request. A cancellation
        (:class:`distill_common.cancel.Cancelled`) passes through."""
        from mlflow.pyfunc import scoring_server

        try:
            res = scoring_server.invocations(body, content_type, self.model, self.input_schema)
        except MlflowException as exc:
            return exc.get_http_status_code(), exc.serialize_as_json(), "application/json"
        return res.status, res.response, res.mimetype


def load_served_model(model_dir: str | Path) -> ServedModel:
    """Load a downloaded, verified generator model (:func:`fetch_servable_model`) for serving; it is verified
    again here, so only a generator this project logged from code is ever loaded."""
    verify_logged_generator(model_dir)
    return ServedModel(mlflow.pyfunc.load_model(str(model_dir)))


def decode_image(b64: str):
    """Decode one ``image`` cell of the pyfunc output into a PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def log_generator_model(run: TrackingRun, generator_dir: str | Path, name: str = "generator") -> str | None:
    """Log a generator folder as a pyfunc model in ``run``; returns its model URI.

    When the tracking store fails (a server that died mid-run), a copy of the folder is kept in the run's
    output dir, the failure is recorded in the run's fallback file, and None is returned instead of losing
    the trained model.
    """
    if not run.enabled:
        raise ModelLoadError("tracking is disabled for this run; enable it to log a registrable model")
    if run.degraded:
        run.record_failure("model", {"generator_dir": str(Path(generator_dir).resolve()), "name": name},
                           ConnectionError("tracking store unavailable"), keep="generator_dir")
        return None
    try:
        return log_model_now(run.run_id, generator_dir, name)
    except Exception as exc:
        run.record_failure("model", {"generator_dir": str(Path(generator_dir).resolve()), "name": name}, exc,
                           keep="generator_dir")
        return None


def _refuse(source: str, problem: str) -> ModelLoadError:
    return ModelLoadError(f"refusing {source}: {problem}; only generators logged by a distill command (a pyfunc "
                          "model from distill's own pyfunc_entry.py with a generator.json) are loaded or served")


def verify_logged_generator(model_dir: str | Path, source: str | None = None) -> Path:
    """Check that a downloaded MLflow model is a generator this project logged from code; return its generator
    folder. Reads files only: nothing is imported or unpickled, so a foreign model is refused before MLflow
    could load it."""
    import yaml

    from distill_common.generator_folder import read_generator_manifest

    root = Path(model_dir).resolve()
    source = source or str(model_dir)
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise _refuse(source, "it is not an MLflow model (no MLmodel file)")
    try:
        spec = yaml.safe_load(mlmodel.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _refuse(source, f"its MLmodel file is unreadable ({type(exc).__name__})") from None
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        raise _refuse(source, f"its flavors are {sorted(flavors) if isinstance(flavors, dict) else flavors!r}, "
                              "not only python_function")
    pf = flavors["python_function"] or {}
    if pf.get("loader_module") != CODE_LOADER or "python_model" in pf:
        raise _refuse(source, f"its pyfunc is loaded by {pf.get('loader_module')!r}"
                              f"{' from a pickled python_model' if 'python_model' in pf else ''}, not from code")
    if pf.get("code"):
        raise _refuse(source, "it adds code paths to the import path")
    code_path = pf.get("model_code_path")
    entry = root / Path(str(code_path)).name if code_path else None
    if entry is None or entry.name != ENTRY_FILE.name or not entry.is_file():
        raise _refuse(source, f"its model code is {code_path!r}, not distill's {ENTRY_FILE.name}")
    if entry.read_bytes() != ENTRY_FILE.read_bytes():
        raise _refuse(source, f"its {ENTRY_FILE.name} differs from this installation's")
    artifacts = pf.get("artifacts") or {}
    if not isinstance(artifacts, dict) or set(artifacts) != {ARTIFACT_KEY}:
        raise _refuse(source, f"its artifacts are {sorted(artifacts) if isinstance(artifacts, dict) else artifacts!r}, "
                              f"not only {ARTIFACT_KEY!r}")
    rel = (artifacts[ARTIFACT_KEY] or {}).get("path") if isinstance(artifacts[ARTIFACT_KEY], dict) else None
    folder = (root / str(rel)).resolve() if rel else None
    if folder is None or not folder.is_relative_to(root) or not (folder / "generator.json").is_file():
        raise _refuse(source, "it holds no generator.json")
    read_generator_manifest(folder)  # a corrupt manifest is a one-line error too
    return folder


def _download(uri: str, dst: str | Path | None) -> Path:
    """A read: a local store that does not exist is refused (:func:`require_store`), never created."""
    from mlflow.artifacts import download_artifacts

    from distill_common.tracking.registry import require_store

    require_store()
    configure()
    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="distill-gen-"))
    try:
        return Path(download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as exc:
        shutil.rmtree(target, ignore_errors=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot download {uri}: {first}; check the name/alias with 'distill registry list'") from None


def download_generator(uri: str, dst: str | Path | None = None) -> Path:
    """Download a ``models:/`` or ``runs:/`` generator and return the folder holding ``generator.json``.

    A logged model (anything with an MLmodel file, and every ``models:/`` URI) must pass
    :func:`verify_logged_generator`; a plain generator folder logged as run artifacts is read as files."""
    local = _download(uri, dst)
    if (local / "MLmodel").is_file() or uri.startswith("models:/"):
        return verify_logged_generator(local, uri)
    for candidate in [local, local / "artifacts" / Path(ARTIFACT_KEY)] + sorted(local.rglob("generator.json")):
        folder = candidate.parent if candidate.name == "generator.json" else candidate
        if (folder / "generator.json").is_file():
            return folder
    raise ModelLoadError(f"{uri} holds no generator.json; it was not logged by a distill command")


def fetch_servable_model(uri: str, dst: str | Path) -> Path:
    """Download a registered generator into ``dst``, verify it (:func:`verify_logged_generator`) and that its
    family's loader is installed; returns the local model folder, so a server loads exactly the checked files."""
    from distill_common.errors import unknown_choice
    from distill_common.generator_folder import generator_loaders, read_generator_manifest

    local = _download(uri, dst)
    family = read_generator_manifest(verify_logged_generator(local, uri)).get("family")
    loaders = generator_loaders()
    if family not in loaders:
        raise unknown_choice("generator family (is its package installed?)", family, loaders)
    return local
