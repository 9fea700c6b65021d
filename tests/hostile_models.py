"""Hostile registry entries for the bad-input tests: a pyfunc whose cloudpickled python_model runs code on load."""

from __future__ import annotations

from pathlib import Path


def register_pickled_pyfunc(tmp_path: Path, marker: Path, name: str = "evil") -> str:
    """Register (as ``name``) a pyfunc whose python_model writes ``marker`` when unpickled. It ships a valid
    generator.json, so only the check of how it loads can refuse it. Returns the version."""
    import mlflow
    import mlflow.pyfunc

    from distill_common import tracking
    from distill_common.generator import write_generator_manifest

    class Evil(mlflow.pyfunc.PythonModel):
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

        def predict(self, context, model_input):
            return model_input

    folder = tmp_path / "evil-gen"
    write_generator_manifest(folder, "rf_cifar", role="student", default_steps=2)
    tracking.configure()
    with tracking.start_run("hostile", name) as run, mlflow.start_run(run_id=run.run_id, nested=True):
        uri = mlflow.pyfunc.log_model(name="generator", python_model=Evil(), artifacts={"generator": str(folder)}).model_uri
    version = tracking.register_model(uri, name)
    marker.unlink(missing_ok=True)  # only what happens from here on counts
    return version
