"""The MLflow model registry: a pipeline's final model as a new version of a registered model, with an alias."""

from __future__ import annotations

from typing import Any

__all__ = ["register_model"]


def register_model(client: Any, model_id: str, name: str, alias: str, *, run_id: str | None,
                   sha256: str) -> str:
    """Register LoggedModel `model_id` as a new version of `name` (created if missing), made by run `run_id`, and
    point `alias` at it; returns the version. Weights already registered under `name` (same sha256, e.g. a cached
    rerun) get the alias on their existing version instead of a new version."""
    _ensure_registered(client, name)
    same = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("pipeline.sha256") == sha256]
    if same:
        version = min(same, key=lambda v: int(v.version))
    else:
        source = client.get_logged_model(model_id).artifact_location  # "models:/<id>" resolves via the global URI
        version = client.create_model_version(name, source=source, model_id=model_id, run_id=run_id,
                                              tags={"pipeline.sha256": sha256})
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def _ensure_registered(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower():
            raise
