"""What the pipeline needs from a tracker (the `Tracker` and `StageRun` protocols), the null tracker, and the
addresses of a tracking store (its SQLite URI, pages of the MLflow UI). No MLflow here."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from pipeline.store.artifacts import ArtifactRef, Manifest

__all__ = ["Inputs", "StageRun", "Tracker", "NullTracker", "sqlite_uri", "ui_address"]

Inputs = Mapping[str, ArtifactRef] | Sequence[ArtifactRef]
"""A stage's inputs by role, e.g. {"prompts": ..., "prev": ...} (a legacy sequence reads as input0, input1, ...)."""


class StageRun(Protocol):
    """The child run of one stage computation."""

    def finish(self, ref: ArtifactRef, manifest: Manifest) -> None:
        """Record the published output: metrics, history, datasets, models, the output digest."""


class Tracker(Protocol):
    """What the stages, the run, the experiment and the flows need from a tracker."""

    def start_pipeline(self, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        """Open the parent run of one pipeline run (or experiment); returns its id, None when nothing is tracked."""

    def end_pipeline(self, status: str) -> None:
        """Close the parent run with status "FINISHED" or "FAILED"."""

    def stage_run(self, stage: str, key: str, config: Mapping[str, Any],
                  inputs: Inputs) -> AbstractContextManager[StageRun]:
        """A context manager yielding a `StageRun` around one computation; an exception marks the run FAILED."""

    def observe(self, name: str, ref: ArtifactRef, *, step: int | None = None) -> None:
        """Called by the run after each stage call (computed or cached) with the stage's name in the chain."""

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Attach a file (plot, table, summary) to the parent run."""

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0, run_id: str | None = None) -> None:
        """Log numeric metrics on a run (the parent by default) at `step`."""

    def register(self, ref: ArtifactRef, name: str, alias: str) -> str | None:
        """Register the model of `ref` as a new version of `name` with `alias`; returns the version, if any."""

    def mark_pruned(self, ref: ArtifactRef, files: Collection[str]) -> None:
        """Say on the logged model (and run) of a round which of its files retention removed (`files` empty: none,
        e.g. once the round is recomputed), so a model whose weights are gone is marked so."""

    def run_url(self, ref: ArtifactRef) -> str | None:
        """The UI address of the run that produced `ref`, if any."""

    def parent_url(self) -> str | None:
        """The UI address of the parent run, if any."""


class _NullRun:
    def finish(self, ref: ArtifactRef, manifest: Manifest) -> None:
        """Record nothing."""


class NullTracker:
    """Tracks nothing (the library's default, and `tracking.enabled = false`)."""

    def start_pipeline(self, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        """No parent run: None."""
        return None

    def end_pipeline(self, status: str) -> None:
        """Nothing to close."""

    @contextmanager
    def stage_run(self, stage: str, key: str, config: Mapping[str, Any], inputs: Inputs) -> Iterator[StageRun]:
        """A run that records nothing."""
        yield _NullRun()

    def observe(self, name: str, ref: ArtifactRef, *, step: int | None = None) -> None:
        """Nothing to observe."""

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Nowhere to attach it."""

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0, run_id: str | None = None) -> None:
        """Nowhere to log them."""

    def register(self, ref: ArtifactRef, name: str, alias: str) -> str | None:
        """No registry: None."""
        return None

    def mark_pruned(self, ref: ArtifactRef, files: Collection[str]) -> None:
        """No model to mark."""

    def run_url(self, ref: ArtifactRef) -> str | None:
        """No UI: None."""
        return None

    def parent_url(self) -> str | None:
        """No UI: None."""
        return None


def sqlite_uri(path: str | Path) -> str:
    """The SQLAlchemy URI of an SQLite file (absolute)."""
    return "sqlite:///" + str(Path(path).resolve())


def ui_address(ui_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """An experiment's (or run's) page in the MLflow UI, in its "Model training" view: MLflow 3 opens experiments
    in its GenAI view (traces, sessions, judges) unless the address asks for the run table's."""
    page = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return page + "?workflowType=machine_learning"
