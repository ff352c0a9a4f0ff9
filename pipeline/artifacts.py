"""Compatibility name: Prefect's stored JSON results name `pipeline.artifacts.ArtifactRef`, so run roots made
before the store moved to `pipeline.store` still load. New code imports `pipeline.store.artifacts`."""

from pipeline.store.artifacts import ArtifactRef, Manifest  # noqa: F401
