"""Generators as MLflow pyfunc models: ``mlflow.pyfunc.load_model("models:/NAME@champion")`` generates images."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from distill_common.errors import ModelLoadError
from distill_common.tracking.run import TrackingRun, configure

ARTIFACT_KEY = "generator"


class GeneratorPyfunc(mlflow.pyfunc.PythonModel):
    """Input rows: ``condition`` (class label or prompt), optional ``seed``, ``steps``, ``guidance``.
    Output rows: the same plus ``image`` (PNG, base64). ``.generator`` is the loaded Generator."""

    def load_context(self, context) -> None:
        from distill_common.generator import load_generator

        self.generator = load_generator(context.artifacts[ARTIFACT_KEY], device="auto")

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        from PIL import Image

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "condition" not in df.columns:
            raise ValueError("input needs a 'condition' column (class label or prompt)")
        params = params or {}
        steps = int(df["steps"].iloc[0]) if "steps" in df else int(params.get("steps", self.generator.default_steps))
        guidance = df["guidance"].iloc[0] if "guidance" in df else params.get("guidance")
        seeds = [int(s) for s in df["seed"]] if "seed" in df else list(range(len(df)))
        conditions = list(df["condition"])
        if self.generator.condition_kind == "class":
            conditions = [int(c) for c in conditions]
        images = self.generator.generate(conditions, steps, seeds, None if guidance is None else float(guidance))
        encoded = []
        for img in images:  # (3, H, W) in [0, 1]
            arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return pd.DataFrame({"condition": df["condition"], "seed": seeds, "steps": steps, "image": encoded})


def decode_image(b64: str):
    """Decode one ``image`` cell of the pyfunc output into a PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def log_generator_model(run: TrackingRun, generator_dir: str | Path, name: str = "generator") -> str | None:
    """Log a generator folder as a pyfunc model in ``run``; returns its model URI.

    When the tracking store fails (a server that died mid-run), the folder stays on disk, the failure is
    recorded in the run's fallback file, and None is returned instead of losing the trained model.
    """
    from distill_common.cli import package_versions

    if not run.enabled:
        raise ModelLoadError("tracking is disabled for this run; enable it to log a registrable model")
    reqs = [f"{d}=={v}" for d, v in package_versions().items() if v != "not installed"]
    # Logged as a model from code (this package's pyfunc_entry.py), so loading it unpickles nothing.
    kwargs = dict(name=name, python_model=str(Path(__file__).with_name("pyfunc_entry.py")), artifacts={ARTIFACT_KEY: str(generator_dir)},
                  pip_requirements=reqs)
    if run.degraded:
        run.record_failure("model", {"generator_dir": str(Path(generator_dir).resolve())},
                           ConnectionError("tracking store unavailable"))
        return None
    try:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.run_id:
            info = mlflow.pyfunc.log_model(**kwargs)
        else:
            with mlflow.start_run(run_id=run.run_id, nested=active is not None):
                info = mlflow.pyfunc.log_model(**kwargs)
    except Exception as exc:
        run.record_failure("model", {"generator_dir": str(Path(generator_dir).resolve())}, exc)
        return None
    return info.model_uri


def download_generator(uri: str, dst: str | Path | None = None) -> Path:
    """Download a ``models:/`` or ``runs:/`` generator and return the folder holding ``generator.json``."""
    from mlflow.artifacts import download_artifacts

    configure()
    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="distill-gen-"))
    try:
        local = Path(download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ModelLoadError(f"cannot download {uri}: {exc}; check the name/alias with 'distill registry list'") from None
    for candidate in [local, local / "artifacts" / Path(ARTIFACT_KEY)] + sorted(local.rglob("generator.json")):
        folder = candidate.parent if candidate.name == "generator.json" else candidate
        if (folder / "generator.json").is_file():
            return folder
    raise ModelLoadError(f"{uri} holds no generator.json; it was not logged by a distill command")
