"""Experiment tracking: the `Tracker` protocol the stages call, a null tracker, and MLflow (the only module that
imports mlflow).

One parent run per pipeline run, one child run per computed stage (explicit `parent_run_id`: MLflow's active
run is thread-local, and Prefect may run a task in another thread). A stage served from the cache opens no run;
its manifest's output sha256 finds the run that made it (tag `pipeline.output_sha256`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from pipeline.artifacts import ArtifactRef, Manifest

__all__ = ["Tracker", "StageRun", "NullTracker"]


class StageRun(Protocol):
    """The child run of one stage computation."""

    def finish(self, ref: ArtifactRef, manifest: Manifest) -> None:
        """Record the published output: metrics, datasets, models, plots, the output digest."""


class Tracker(Protocol):
    """What the stages need from a tracker."""

    def stage_run(self, stage: str, key: str, config: Mapping[str, Any],
                  inputs: Sequence[ArtifactRef]) -> Iterator[StageRun]:
        """A context manager around one stage computation; an exception marks the run FAILED."""


class _NullRun:
    def finish(self, ref: ArtifactRef, manifest: Manifest) -> None:
        pass


class NullTracker:
    """Tracks nothing (the library's default; tests and `python -m pipeline.run --no-tracking`)."""

    @contextmanager
    def stage_run(self, stage: str, key: str, config: Mapping[str, Any],
                  inputs: Sequence[ArtifactRef]) -> Iterator[StageRun]:
        yield _NullRun()
