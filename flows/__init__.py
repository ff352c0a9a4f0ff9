"""Prefect flows over `pipeline.stages` (one-line tasks)."""
