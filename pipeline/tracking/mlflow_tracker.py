"""Experiment tracking: the `Tracker` protocol the stages call, a null tracker, and MLflow (the only module that
imports mlflow).

Run structure: one parent run per pipeline run, one child run per stage computation (explicit
`parent_run_id`: MLflow's active run is thread-local, and Prefect may run a task in another thread). A child
run holds the stage's config as params, its per-step history as metrics (step = optimizer step), its metrics,
its manifest, and the edges of the lineage:

- datasets (prompt splits, teacher responses, each round's group dataset, eval samples) as dataset inputs with
  an explicit digest (the file's sha256; MLflow's own digest reads only 10k rows), context "output" on the
  producer and "training"/"evaluation" on consumers;
- models as MLflow 3 LoggedModels without artifacts (the checkpoint stays in the artifact store; tags give its
  uri and sha256): the producer logs it as an output, the consumer as an input, so lineage is visible
  from the prompt set to the final model, which is registered with an alias.

A stage served from the cache opens no run: `observe` tags the parent with `reused.<name>` and the run that
made it (found by the tag `pipeline.output_sha256`). Every run carries the tags of `context_tags()` (the flow
sets it to the Prefect flow-run and task-run ids).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.store.artifacts import ArtifactRef, Manifest, named_inputs, tree_sha256
from pipeline.store.outputs import StageOutput, find_output

__all__ = ["Tracker", "StageRun", "NullTracker", "MlflowTracker", "sqlite_uri"]

log = logging.getLogger(__name__)

Inputs = Mapping[str, ArtifactRef] | Sequence[ArtifactRef]
"""A stage's inputs by role (a legacy sequence is read as input0, input1, ...)."""
MODEL_KINDS = ("model", "external_model")


class StageRun(Protocol):
    """The child run of one stage computation."""

    def finish(self, ref: ArtifactRef, manifest: Manifest) -> None:
        """Record the published output: metrics, history, datasets, models, the output digest."""


class Tracker(Protocol):
    """What the stages and the run need from a tracker."""

    def stage_run(self, stage: str, key: str, config: Mapping[str, Any],
                  inputs: Inputs) -> Any:
        """A context manager yielding a `StageRun` around one computation; an exception marks the run FAILED."""

    def observe(self, name: str, ref: ArtifactRef, *, step: int | None = None) -> None:
        """Called by the run after each stage call (computed or cached) with the stage's name in the chain."""

    def run_url(self, ref: ArtifactRef) -> str | None:
        """The UI address of the run that produced `ref`, if any."""


class _NullRun:
    def finish(self, ref: ArtifactRef, manifest: Manifest) -> None:
        pass


class NullTracker:
    """Tracks nothing (the library's default, and `tracking.enabled = false`)."""

    @contextmanager
    def stage_run(self, stage: str, key: str, config: Mapping[str, Any],
                  inputs: Inputs) -> Iterator[StageRun]:
        yield _NullRun()

    def observe(self, name: str, ref: ArtifactRef, *, step: int | None = None) -> None:
        pass

    def run_url(self, ref: ArtifactRef) -> str | None:
        return None

    def start_pipeline(self, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        pass

    def end_pipeline(self, status: str) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0, run_id: str | None = None) -> None:
        pass

    def register(self, ref: ArtifactRef, name: str, alias: str) -> None:
        return None

    def parent_url(self) -> None:
        return None


def sqlite_uri(path: str | Path) -> str:
    """The SQLAlchemy URI of an SQLite file (absolute)."""
    return "sqlite:///" + str(Path(path).resolve())


def ui_address(ui_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """An experiment's (or run's) page in the MLflow UI, in its "Model training" view: MLflow 3 opens experiments
    in its GenAI view (traces, sessions, judges) unless the address asks for the run table's."""
    page = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return page + "?workflowType=machine_learning"


def experiment_addresses(uri: str, ui_url: str) -> list[tuple[str, str]]:
    """(name, UI address) of every experiment on a tracking server that has runs."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [(e.name, ui_address(ui_url, e.experiment_id)) for e in client.search_experiments()
            if len(client.search_runs([e.experiment_id], max_results=1))]


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"SFTConfig.train.lr": "0.001", ...} (MLflow params are flat strings of <= 6000 chars)."""
    if isinstance(obj, Mapping):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(obj)[:6000] if not isinstance(obj, str) else obj[:6000]}


def metric_name(key: str) -> str:
    """MLflow's spelling of a metric key: "mean@4" -> "mean_at_4" (MLflow rejects "@")."""
    return key.replace("@", "_at_")


@dataclass
class MlflowTracker:
    """Tracks a pipeline run in MLflow (any tracking URI; the default is SQLite in the run root)."""

    uri: str
    experiment: str
    artifact_location: str | None = None
    ui_url: str | None = None
    context_tags: Callable[[], dict[str, str]] = dict
    parent_run_id: str | None = None
    _produced: set[str] = field(default_factory=set)
    _entities: dict[tuple[str, str], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._mlflow = mlflow
        exp = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            self.experiment, artifact_location=self.artifact_location)

    # -- the pipeline's parent run ---------------------------------------------------------------------------

    def start_pipeline(self, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Open the parent run of one pipeline run; child runs attach to it explicitly."""
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"pipeline.stage": "pipeline", **tags, **self.context_tags()})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, config)
        self.client.log_dict(self.parent_run_id, dict(config), "config.json")
        return self.parent_run_id

    def end_pipeline(self, status: str) -> None:
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """A file (plot, table, summary) attached to the parent run."""
        self.client.log_artifact(self.parent_run_id, str(path), folder)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0, run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(batch), 900):  # the REST API takes at most 1000 metrics per call
            self.client.log_batch(run_id or self.parent_run_id, metrics=batch[i:i + 900])

    def _log_params(self, run_id: str, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 90):
            self.client.log_batch(run_id, params=params[i:i + 90])

    # -- child runs --------------------------------------------------------------------------------------------

    @contextmanager
    def stage_run(self, stage: str, key: str, config: Mapping[str, Any],
                  inputs: Inputs) -> Iterator[_MlflowStageRun]:
        tags = {"pipeline.stage": stage, "pipeline.key": key, **self.context_tags()}
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        run_id = run.info.run_id
        try:
            self._log_params(run_id, config)
            self._log_inputs(run_id, stage, inputs)
            yield _MlflowStageRun(self, run_id, stage)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def _log_inputs(self, run_id: str, stage: str, inputs: Inputs) -> None:
        """Model inputs as LoggedModels; of the other inputs, the datasets they declare for this stage's purpose
        ("evaluation" for an evaluation, else "training": SFT reads train.parquet, evaluate eval.parquet)."""
        from mlflow.entities import LoggedModelInput

        purpose = "evaluation" if stage == "evaluate" else "training"
        refs = list(named_inputs(inputs).values())
        data = [out for ref in refs if ref.kind not in MODEL_KINDS and (out := find_output(ref)) is not None]
        datasets = [self._dataset_input(out, name, purpose) for out in data
                    for name, context in out.datasets.items() if context == purpose]
        models = [LoggedModelInput(self.model_id(ref)) for ref in refs if ref.kind in MODEL_KINDS]
        self.client.log_inputs(run_id, datasets=datasets or None, models=models or None)

    def _dataset_input(self, out: StageOutput, name: str, context: str) -> Any:
        """One dataset file of a stage output as a DatasetInput with its context ("output" on the producer)."""
        from mlflow.entities import DatasetInput, InputTag

        return DatasetInput(self._dataset_entity(out, name), tags=[InputTag("mlflow.data.context", context)])

    def _dataset_entity(self, out: StageOutput, name: str) -> Any:
        """The MLflow dataset of one parquet file, read once per tracker (every round consumes the same prompts)."""
        import pandas as pd

        ref = out.ref
        digest = out.file_digest(name)[:16]
        key = (str(ref.path / name), digest)
        if key not in self._entities:
            with warnings.catch_warnings():  # MLflow's own: a source class registered twice; a schema hint
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
                ds = self._mlflow.data.from_pandas(pd.read_parquet(ref.path / name), source=key[0], digest=digest,
                                                   name=f"{ref.path.parent.name}/{name.removesuffix('.parquet')}")
                self._entities[key] = ds._to_mlflow_entity()
        return self._entities[key]

    def model_id(self, ref: ArtifactRef) -> str:
        """The LoggedModel of a model reference: found by its sha256 (here, else in another experiment), else
        created (external models, or outputs of runs that were not tracked)."""
        found = self._here_then_elsewhere(lambda ids: self.client.search_logged_models(
            ids, filter_string=f"tags.`pipeline.sha256` = '{ref.sha256}'", max_results=1))
        if len(found):
            return found[0].model_id
        name = ref.path.name if ref.kind == "external_model" else f"{ref.path.parent.name}-{ref.path.name[:8]}"
        return self._new_model(name, ref, source_run_id=None)

    def _new_model(self, name: str, ref: ArtifactRef, source_run_id: str | None) -> str:
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=source_run_id, model_type="causal-lm",
            tags={"pipeline.sha256": ref.sha256, "pipeline.uri": ref.uri, "pipeline.kind": ref.kind})
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def _log_outputs(self, run_id: str, stage: str, out: StageOutput) -> list[str]:
        """The output's declared datasets (context "output") and its models as LoggedModels made by this run."""
        from mlflow.entities import LoggedModelOutput

        ref = out.ref
        datasets = [self._dataset_input(out, name, "output") for name in out.datasets]
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)
        models = []
        if ref.kind == "model":
            models.append(self._new_model(stage, ref, run_id))
        elif ref.kind == "models":  # the bootstrap pair: one model per member folder
            for member in sorted(p for p in ref.path.iterdir() if p.is_dir()):
                sub = ArtifactRef(kind="model", uri=str(member), sha256=tree_sha256(member), schema_version=1)
                models.append(self._new_model(member.name, sub, run_id))
        if models:
            self.client.log_outputs(run_id, [LoggedModelOutput(m, step=0) for m in models])
        return models

    # -- after each stage call --------------------------------------------------------------------------------

    def _here_then_elsewhere(self, search: Callable[[list[str]], Sequence[Any]]) -> Sequence[Any]:
        """`search(experiment_ids)` in this experiment, then, if that found nothing, in every other experiment of
        the tracking server (a run reuses what a run of another experiment made)."""
        found = search([self.experiment_id])
        if len(found):
            return found
        others = [e.experiment_id for e in self.client.search_experiments(max_results=1000)
                  if e.experiment_id != self.experiment_id]
        return search(others) if others else []

    def _producer(self, ref: ArtifactRef) -> Any | None:
        """The RunInfo of the (earliest) run whose output has this digest."""
        runs = self._here_then_elsewhere(lambda ids: self.client.search_runs(
            ids, filter_string=f"tags.`pipeline.output_sha256` = '{ref.sha256}'", max_results=1,
            order_by=["attributes.start_time ASC"]))
        return runs[0].info if len(runs) else None

    def producer_run(self, ref: ArtifactRef) -> str | None:
        """The id of the run that produced this output (None if it was never tracked on this server)."""
        info = self._producer(ref)
        return None if info is None else info.run_id

    def observe(self, name: str, ref: ArtifactRef, *, step: int | None = None) -> None:
        """Round and stage metrics on the parent (per round: step = round); reused outputs tagged."""
        if self.parent_run_id is None:
            return
        out = find_output(ref)
        if ref.sha256 not in self._produced:
            producer = self.producer_run(ref)
            self.client.set_tag(self.parent_run_id, f"reused.{name}", producer or "untracked")
        if out is not None and out.metrics:
            self.log_metrics({f"{name}/{k}": v for k, v in out.metrics.items()}, step=step or 0)

    def run_url(self, ref: ArtifactRef) -> str | None:
        info = self._producer(ref) if self.ui_url else None
        if info is None:
            return None
        return ui_address(self.ui_url, info.experiment_id, info.run_id)

    def parent_url(self) -> str | None:
        if self.parent_run_id is None or not self.ui_url:
            return None
        return ui_address(self.ui_url, self.experiment_id, self.parent_run_id)

    def register(self, ref: ArtifactRef, name: str, alias: str) -> str:
        """Register the model of `ref` as a new version of `name` and point `alias` at it; returns the version."""
        from mlflow.exceptions import MlflowException

        model_id = self.model_id(ref)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower():
                raise
        source = self.client.get_logged_model(model_id).artifact_location  # "models:/<id>" resolves via the global URI
        version = self.client.create_model_version(name, source=source, model_id=model_id,
                                                   run_id=self.parent_run_id,
                                                   tags={"pipeline.sha256": ref.sha256})
        self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)


@dataclass
class _MlflowStageRun:
    tracker: MlflowTracker
    run_id: str
    stage: str

    def finish(self, ref: ArtifactRef, manifest: Manifest) -> None:
        t, out = self.tracker, StageOutput(ref, manifest)
        stepped: set[str] = set()
        for row in out.history():
            per_step = {f"train/{k}": v for k, v in row.items() if k != "step"}
            t.log_metrics(per_step, step=int(row["step"]), run_id=self.run_id)
            stepped.update(per_step)
        t.log_metrics({k: v for k, v in manifest.metrics.items() if k not in stepped}, run_id=self.run_id)
        t._log_outputs(self.run_id, self.stage, out)
        model = out.inputs.get("model") if ref.kind == "eval" else None
        if model is not None and model.kind in MODEL_KINDS:
            for k, v in manifest.metrics.items():  # model-scoped: shown on the LoggedModel's page
                t.client.log_metric(self.run_id, metric_name(f"eval/{k}"), v, model_id=t.model_id(model))
        t.client.log_text(self.run_id, manifest.model_dump_json(indent=2), "manifest.json")
        t.client.set_tag(self.run_id, "pipeline.output_sha256", ref.sha256)
        t.client.set_tag(self.run_id, "pipeline.output_uri", ref.uri)
        t._produced.add(ref.sha256)

