"""Logging a generator folder as an MLflow pyfunc model *from code* (this package's ``pyfunc_entry.py``), so
loading it unpickles nothing. Kept apart from :mod:`distill_common.tracking.pyfunc` so that the run layer (which
re-sends models a dead server missed) and the pyfunc layer (which builds on runs) do not import each other."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

ARTIFACT_KEY = "generator"
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")


def log_model_now(run_id: str, generator_dir: str | Path, name: str = "generator") -> str:
    """Log a generator folder as a pyfunc model from code in run ``run_id``; raises when the store fails."""
    from distill_common.versions import package_versions

    reqs = [f"{d}=={v}" for d, v in package_versions().items() if v != "not installed"]
    # Logged as a model from code (this package's pyfunc_entry.py), so loading it unpickles nothing.
    kwargs = dict(name=name, python_model=str(ENTRY_FILE), artifacts={ARTIFACT_KEY: str(generator_dir)},
                  pip_requirements=reqs)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return mlflow.pyfunc.log_model(**kwargs).model_uri
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        return mlflow.pyfunc.log_model(**kwargs).model_uri
