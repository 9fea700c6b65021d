"""MLflow model registry: register versions, move aliases, find the best version by a metric."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distill_common.errors import TrackingError
from distill_common.tracking.run import configure

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


def _client():
    from mlflow import MlflowClient

    configure()
    return MlflowClient()


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
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()},
                               await_registration_for=60)
    if description:
        client.update_model_version(name, mv.version, description=description)
    return str(mv.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    _client().set_registered_model_alias(name, alias, str(version))


def delete_alias(name: str, alias: str) -> None:
    _client().delete_registered_model_alias(name, alias)


def set_version_tags(name: str, version: str | int, tags: Mapping[str, Any], description: str | None = None) -> None:
    client = _client()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))
    if description is not None:
        client.update_model_version(name, str(version), description=description)


def version_by_alias(name: str, alias: str) -> ModelVersionInfo | None:
    client = _client()
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except Exception:
        return None
    return _info(client, mv)


def _info(client, mv) -> ModelVersionInfo:
    metrics: dict[str, float] = {}
    tags = dict(mv.tags or {})
    for k, v in tags.items():  # evaluation results are stamped on versions as eval.<metric> tags
        if k.startswith("eval."):
            try:
                metrics[k[5:]] = float(v)
            except ValueError:
                pass
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
    client = _client()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception as exc:
        raise TrackingError(f"cannot read registered model {name!r}: {exc}") from None
    infos = sorted((_info(client, mv) for mv in versions), key=lambda v: int(v.version))
    # search results do not carry aliases on every store: read them from the registered model
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except Exception:
        aliases = {}
    for info in infos:
        info.aliases = sorted(a for a, v in aliases.items() if str(v) == info.version)
    return infos


def list_models() -> list[str]:
    return sorted(rm.name for rm in _client().search_registered_models())


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
