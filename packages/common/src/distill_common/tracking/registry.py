"""MLflow model registry: register versions, move aliases, find the best version by a metric."""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_common.errors import TrackingError
from distill_common.tracking.run import _sqlite_path, configure, tracking_uri

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass
class ModelVersionInfo:
    name: str
    version: str
    run_id: str | None
    aliases: list[str]
    tags: dict[str, str]
    description: str
    metrics: dict[str, float] = field(default_factory=dict)


def require_store(uri: str | None = None) -> str:
    """Refuse to read a local store that does not exist (opening it would create an empty one); returns the URI."""
    uri = uri or tracking_uri()
    path = _sqlite_path(uri)
    if path is None and (uri.startswith("file:") or "://" not in uri):
        path = Path(uri.removeprefix("file://").removeprefix("file:"))
    if path is not None and not path.exists():
        raise TrackingError(f"no MLflow store at {uri}: nothing was tracked from this folder; run from the folder "
                            "that holds mlflow.db, or pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store")
    return uri


def _client(read: bool = False):
    """The registry client; ``read``: a read-only use, which never creates a local store (:func:`require_store`)."""
    from mlflow import MlflowClient

    if read:
        require_store()
    configure()
    # A failing sqlite store logs a full SQLAlchemy traceback before raising; the raised error is reported as
    # one line (_read_error), so the log's duplicate is silenced.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    return MlflowClient()


def _error_code(exc: Exception) -> str | None:
    return getattr(exc, "error_code", None)


def _read_error(what: str, exc: Exception) -> TrackingError:
    """A registry read that failed for another reason than "not there": one line, never "no champion"."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return TrackingError(f"cannot read {what} from the registry at {tracking_uri()} ({type(exc).__name__}: {first}); "
                         "check that the tracking store is reachable (MLFLOW_TRACKING_URI) and retry")


def _is_missing(exc: Exception) -> bool:
    return _error_code(exc) == "RESOURCE_DOES_NOT_EXIST"


def non_finite(value: Any) -> bool:
    """True for NaN/inf numbers and for strings that parse as them ("nan", "inf", "-Infinity")."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return not math.isfinite(float(value))
    if isinstance(value, str):
        try:
            return not math.isfinite(float(value))
        except ValueError:
            return False
    return False


def register_model(model_uri: str, name: str, *, tags: Mapping[str, Any] | None = None,
                   description: str | None = None) -> str:
    """Register ``model_uri`` (e.g. ``runs:/ID/generator`` or a logged model URI) as a new version of ``name``."""
    import mlflow

    configure()
    client = _client()
    try:
        client.create_registered_model(name)
    except Exception:  # already exists (possibly created concurrently)
        pass
    fluent = logging.getLogger("mlflow.tracking._model_registry.fluent")
    level = fluent.level
    fluent.setLevel(logging.WARNING)  # "Registered model ... already exists": true, since it was created just above
    try:
        mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()},
                                   await_registration_for=60)
    finally:
        fluent.setLevel(level)
    if description:
        client.update_model_version(name, mv.version, description=description)
    return str(mv.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    _client().set_registered_model_alias(name, alias, str(version))


def delete_alias(name: str, alias: str) -> None:
    _client().delete_registered_model_alias(name, alias)


def set_version_tags(name: str, version: str | int, tags: Mapping[str, Any], description: str | None = None) -> list[str]:
    """Set tags on a version; non-finite numbers (NaN, inf) are never written. Returns the keys left out."""
    client = _client()
    dropped = sorted(k for k, v in tags.items() if non_finite(v))
    if dropped:
        warnings.warn(f"not stamping {name} v{version} with non-finite values: {', '.join(dropped)}", stacklevel=2)
    for k, v in tags.items():
        if k not in dropped:
            client.set_model_version_tag(name, str(version), k, str(v))
    if description is not None:
        client.update_model_version(name, str(version), description=description)
    return dropped


def version_by_alias(name: str, alias: str) -> ModelVersionInfo | None:
    """The version holding ``alias``; None only when the model or the alias does not exist.

    Any other failure (server down, broken store) raises a one-line TrackingError: an outage must
    never read as "no champion yet".
    """
    client = _client(read=True)
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except Exception as exc:
        if _is_missing(exc):
            return None
        raise _read_error(f"the aliases of {name!r}", exc) from None
    if alias not in aliases:
        return None
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        raise _read_error(f"{name}@{alias}", exc) from None
    return _info(client, mv)


def _info(client, mv) -> ModelVersionInfo:
    metrics: dict[str, float] = {}
    tags = dict(mv.tags or {})
    for k, v in tags.items():  # evaluation results are stamped on versions as eval.<metric> tags
        if k.startswith("eval."):
            try:
                value = float(v)
            except ValueError:
                continue
            if math.isfinite(value):  # a NaN or inf result is never a score
                metrics[k[5:]] = value
    return ModelVersionInfo(mv.name, str(mv.version), mv.run_id, list(getattr(mv, "aliases", []) or []),
                            tags, mv.description or "", metrics)


def resolve_model_version(uri: str) -> tuple[str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version); (None, None) when unresolvable."""
    if not uri.startswith("models:/"):
        return None, None
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        info = version_by_alias(name, alias)
        return (name, info.version) if info else (None, None)
    if "/" in body:
        name, version = body.split("/", 1)
        return name, version
    return None, None


def list_versions(name: str) -> list[ModelVersionInfo]:
    client = _client(read=True)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception as exc:
        raise _read_error(f"the versions of {name!r}", exc) from None
    infos = sorted((_info(client, mv) for mv in versions), key=lambda v: int(v.version))
    # search results do not carry aliases on every store: read them from the registered model
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except Exception as exc:
        if not (_is_missing(exc) and not infos):
            raise _read_error(f"the aliases of {name!r}", exc) from None
        aliases = {}
    for info in infos:
        info.aliases = sorted(a for a, v in aliases.items() if str(v) == info.version)
    return infos


def list_models() -> list[str]:
    client = _client(read=True)
    try:
        return sorted(rm.name for rm in client.search_registered_models())
    except Exception as exc:
        raise _read_error("the registered models", exc) from None


def best_version(name: str, metric: str, *, lower_is_better: bool = True,
                 where: Mapping[str, Any] | None = None) -> ModelVersionInfo | None:
    """The version with the best ``eval.<metric>`` tag among those whose tags match ``where``."""
    candidates = [
        v for v in list_versions(name)
        if metric in v.metrics and all(str(v.tags.get(k)) == str(val) for k, val in (where or {}).items())
    ]
    if not candidates:
        return None
    return (min if lower_is_better else max)(candidates, key=lambda v: v.metrics[metric])
