"""The MLflow tracker: one parent run per pipeline run, one child run per stage computation, the lineage of every
output. It composes the concerns of its sibling modules: `runs` (parent and child runs, params, metrics), `lineage`
(datasets and LoggedModels as inputs and outputs, the producer of an output) and `registry` (the final model).

A stage served from the cache opens no run: `observe` tags the parent with `reused.<name>` and the run that made
it (found by the tag `pipeline.output_sha256`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.store.artifacts import ArtifactRef, Manifest, StageStore, named_inputs
from pipeline.store.outputs import StageOutput, find_output
from pipeline.tracking.base import Inputs, ui_address
from pipeline.tracking.lineage import Lineage
from pipeline.tracking.registry import register_model
from pipeline.tracking.runs import Runs, check_server, create_sqlite_store, open_experiment, relocate_sqlite_store

__all__ = ["MlflowTracker"]


class MlflowTracker:
    """Tracks a pipeline run in MLflow (any tracking URI; the default is SQLite in the run root)."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None, ui_url: str | None = None,
                 context_tags: Callable[[], dict[str, str]] = dict, parent_run_id: str | None = None):
        from mlflow import MlflowClient

        self.uri, self.experiment, self.artifact_location, self.ui_url = uri, experiment, artifact_location, ui_url
        if uri.startswith("sqlite:///"):  # created, or re-pointed at this root's artifact folder after a move
            db = create_sqlite_store(Path(uri.removeprefix("sqlite:///")), artifact_location)
            relocate_sqlite_store(db, artifact_location)
        elif uri.startswith(("http://", "https://")):
            check_server(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id = open_experiment(self.client, experiment, artifact_location)
        self.runs = Runs(self.client, self.experiment_id, context_tags, parent_run_id)
        self.lineage = Lineage(self.client, self.experiment_id)
        self._observed: list[ArtifactRef] = []

    @property
    def parent_run_id(self) -> str | None:
        """The id of the open parent run (None before `start_pipeline`)."""
        return self.runs.parent_run_id

    # -- the parent run ----------------------------------------------------------------------------------------

    def start_pipeline(self, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Open the parent run of one pipeline run; child runs attach to it explicitly."""
        return self.runs.start_parent(run_name, config, tags)

    def end_pipeline(self, status: str) -> None:
        """Mark the models of the rounds this run saw that retention pruned, then close the parent run."""
        try:
            for ref in dict.fromkeys(self._observed):
                gone = StageStore(ref.path.parent.parent).pruned(ref)
                if gone or ref.sha256 in self.lineage.produced:  # pruned, or recomputed complete by this run
                    self.mark_pruned(ref, gone)
        finally:
            self.runs.end_parent(status)

    def mark_pruned(self, ref: ArtifactRef, files: Collection[str]) -> None:
        """Tag `pipeline.pruned` (the folders retention removed, e.g. "model/ state/") on the LoggedModels and the
        producing run of `ref`, or remove the tag when nothing is gone (the round was recomputed)."""
        self.lineage.mark_pruned(ref, files)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """A file (plot, table, summary) attached to the parent run."""
        self.runs.log_artifact(path, folder)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0, run_id: str | None = None) -> None:
        """Numeric metrics on a run (the parent by default) at `step`."""
        self.runs.log_metrics(metrics, step=step, run_id=run_id)

    # -- child runs --------------------------------------------------------------------------------------------

    @contextmanager
    def stage_run(self, stage: str, key: str, config: Mapping[str, Any], inputs: Inputs) -> Iterator[_MlflowStageRun]:
        """The child run of one computation: its config as params, its inputs as datasets and LoggedModels."""
        run_id = self.runs.start_child(stage, key)
        try:
            self.runs.log_params(run_id, config)
            self.lineage.log_inputs(run_id, stage, named_inputs(inputs))
            yield _MlflowStageRun(self, run_id, stage)
        except BaseException:
            self.runs.end(run_id, "FAILED")
            raise
        self.runs.end(run_id, "FINISHED")

    def observe(self, name: str, ref: ArtifactRef, *, step: int | None = None) -> None:
        """Round and stage metrics on the parent (per round: step = round); reused outputs tagged."""
        if self.parent_run_id is None:
            return
        if ref.kind == "model":
            self._observed.append(ref)  # its pruning is marked at the end of the run (`end_pipeline`)
        out = find_output(ref)
        if ref.sha256 not in self.lineage.produced:
            self.runs.tag_parent(f"reused.{name}", self.producer_run(ref) or "untracked")
        if out is not None and out.metrics:
            self.log_metrics({f"{name}/{k}": v for k, v in out.metrics.items()}, step=step or 0)

    # -- lookups and the registry ------------------------------------------------------------------------------

    def model_id(self, ref: ArtifactRef) -> str:
        """The LoggedModel of a model reference (found by its sha256, else created)."""
        return self.lineage.model_id(ref)

    def producer_run(self, ref: ArtifactRef) -> str | None:
        """The id of the run that produced this output (None if it was never tracked on this server)."""
        info = self.lineage.producer(ref)
        return None if info is None else info.run_id

    def run_url(self, ref: ArtifactRef) -> str | None:
        """The UI address of the run that produced `ref`, if there is a UI and such a run."""
        info = self.lineage.producer(ref) if self.ui_url else None
        return None if info is None else ui_address(self.ui_url, info.experiment_id, info.run_id)

    def parent_url(self) -> str | None:
        """The UI address of the parent run, if there is a UI and a parent run."""
        if self.parent_run_id is None or not self.ui_url:
            return None
        return ui_address(self.ui_url, self.experiment_id, self.parent_run_id)

    def register(self, ref: ArtifactRef, name: str, alias: str) -> str:
        """Register the model of `ref` as a new version of `name` and point `alias` at it; returns the version."""
        return register_model(self.client, self.model_id(ref), name, alias, run_id=self.parent_run_id,
                              sha256=ref.sha256)


@dataclass
class _MlflowStageRun:
    """The open child run of one stage computation."""

    tracker: MlflowTracker
    run_id: str
    stage: str

    def finish(self, ref: ArtifactRef, manifest: Manifest) -> None:
        """History and metrics, the output's datasets and models, its manifest and digest, on the child run."""
        runs, lineage, out = self.tracker.runs, self.tracker.lineage, StageOutput(ref, manifest)
        runs.log_stage_metrics(self.run_id, out.history(), out.metrics)
        lineage.log_outputs(self.run_id, self.stage, out)
        lineage.log_model_metrics(self.run_id, out)
        runs.log_manifest(self.run_id, manifest)
        lineage.mark_produced(self.run_id, ref)
