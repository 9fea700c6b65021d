"""MLflow tracking and model registry: the only part of the workspace that imports mlflow."""

from distill_common.tracking.artifacts import download_run_artifacts, list_run_artifacts, run_start_time
from distill_common.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    ModelVersionInfo,
    best_version,
    delete_alias,
    list_models,
    list_versions,
    register_model,
    require_store,
    resolve_model_version,
    set_alias,
    set_version_tags,
    version_by_alias,
)
from distill_common.tracking.run import (
    RelogReport,
    TrackingRun,
    artifact_root,
    check_reachable,
    check_store_writable,
    configure,
    is_remote,
    relog,
    start_run,
    tracking_uri,
    using_store,
)


def log_generator_model(run, generator_dir, name: str = "generator") -> str:
    from distill_common.tracking.pyfunc import log_generator_model as _log

    return _log(run, generator_dir, name)


def download_generator(uri, dst=None):
    from distill_common.tracking.pyfunc import download_generator as _dl

    return _dl(uri, dst)


def verify_logged_generator(model_dir, source=None):
    from distill_common.tracking.pyfunc import verify_logged_generator as _verify

    return _verify(model_dir, source)


def fetch_servable_model(uri, dst):
    from distill_common.tracking.pyfunc import fetch_servable_model as _fetch

    return _fetch(uri, dst)


def load_served_model(model_dir):
    from distill_common.tracking.pyfunc import load_served_model as _load

    return _load(model_dir)


def decode_image(b64: str):
    from distill_common.tracking.pyfunc import decode_image as _decode

    return _decode(b64)


__all__ = [
    "CHALLENGER", "CHAMPION", "ModelVersionInfo", "RelogReport", "TrackingRun", "artifact_root", "best_version",
    "check_reachable", "check_store_writable", "configure", "decode_image", "is_remote", "delete_alias",
    "download_generator", "download_run_artifacts", "fetch_servable_model", "list_models", "list_run_artifacts",
    "list_versions", "load_served_model", "log_generator_model", "register_model", "relog", "require_store", "resolve_model_version", "set_alias", "set_version_tags",
    "run_start_time", "start_run", "tracking_uri", "using_store", "verify_logged_generator", "version_by_alias",
]
