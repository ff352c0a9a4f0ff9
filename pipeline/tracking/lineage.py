"""The edges of the lineage in MLflow, as the stage outputs' manifests declare them, and the run that made an output.

- datasets (prompt splits, teacher responses, each round's group dataset, eval samples): the files an output's
  manifest declares (`Manifest.datasets`), logged as dataset inputs with an explicit digest (the file's sha256;
  MLflow's own digest reads only 10k rows), context "output" on the producer and the declared context
  ("training"/"evaluation") on consumers whose purpose it is;
- models as MLflow 3 LoggedModels without artifacts (the checkpoint stays in the artifact store; tags give its
  uri and sha256): the producer logs it as an output, the consumer as an input, so lineage is visible from the
  prompt set to the final model; an evaluation's metrics also go on the LoggedModel of its `model` input.

The run that made an output is found by its tag `pipeline.output_sha256`, here first, then in every other
experiment of the tracking server (a run reuses what a run of another experiment made).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.store.artifacts import ArtifactRef, tree_sha256
from pipeline.store.outputs import StageOutput, find_output
from pipeline.tracking.runs import metric_name

__all__ = ["Lineage", "MODEL_KINDS", "PRUNED_TAG", "purpose", "dataset_name"]

MODEL_KINDS = ("model", "external_model")
PRUNED_TAG = "pipeline.pruned"
"""On a round's LoggedModel and run: the folders retention removed from its output (its weights are gone)."""


def purpose(stage: str) -> str:
    """The dataset context a stage consumes: "evaluation" for an evaluation (eval.parquet), else "training"."""
    return "evaluation" if stage == "evaluate" else "training"


def dataset_name(out: StageOutput, name: str) -> str:
    """The MLflow name of one dataset file: `benchmark/<name>` for a named benchmark's prompts, else
    `<stage>/<file stem>` (e.g. prepare_data/eval: the held-out split)."""
    benchmark = out.manifest.config.get("arguments", {}).get("benchmark") if out.stage == "prepare_benchmark" else None
    return f"benchmark/{benchmark}" if benchmark else f"{out.path.parent.name}/{name.removesuffix('.parquet')}"


@dataclass
class Lineage:
    """Datasets and LoggedModels of the stage runs of one experiment, and the producers of outputs."""

    client: Any
    experiment_id: str
    produced: set[str] = field(default_factory=set)
    """Output digests whose producing run this tracker opened (the others were served from the cache)."""
    _entities: dict[tuple[str, str], Any] = field(default_factory=dict)

    def log_inputs(self, run_id: str, stage: str, inputs: Mapping[str, ArtifactRef]) -> None:
        """Model inputs as LoggedModels; of the other inputs, the datasets they declare for this stage's purpose."""
        from mlflow.entities import LoggedModelInput

        data = [out for ref in inputs.values() if ref.kind not in MODEL_KINDS and (out := find_output(ref))]
        datasets = [self._dataset_input(out, name, context) for out in data
                    for name, context in out.datasets.items() if context == purpose(stage)]
        models = [LoggedModelInput(self.model_id(ref)) for ref in inputs.values() if ref.kind in MODEL_KINDS]
        self.client.log_inputs(run_id, datasets=datasets or None, models=models or None)

    def log_outputs(self, run_id: str, stage: str, out: StageOutput) -> list[str]:
        """The output's declared datasets (context "output") and its models as LoggedModels made by this run."""
        from mlflow.entities import LoggedModelOutput

        datasets = [self._dataset_input(out, name, "output") for name in out.datasets]
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)
        ref, models = out.ref, []
        if ref.kind == "model":
            models.append(self._new_model(stage, ref, run_id))
        elif ref.kind == "models":  # the bootstrap pair: one model per member folder
            for member in sorted(p for p in ref.path.iterdir() if p.is_dir()):
                sub = ArtifactRef(kind="model", uri=str(member), sha256=tree_sha256(member), schema_version=1)
                models.append(self._new_model(member.name, sub, run_id))
        if models:
            self.client.log_outputs(run_id, [LoggedModelOutput(m, step=0) for m in models])
        return models

    def log_model_metrics(self, run_id: str, out: StageOutput) -> None:
        """An evaluation's metrics, scoped to the LoggedModel of its `model` input (shown on the model's page)."""
        model = out.inputs.get("model") if out.ref.kind == "eval" else None
        if model is None or model.kind not in MODEL_KINDS:
            return
        model_id = self.model_id(model)
        for k, v in out.metrics.items():
            self.client.log_metric(run_id, metric_name(f"eval/{k}"), v, model_id=model_id)

    def mark_produced(self, run_id: str, ref: ArtifactRef) -> None:
        """Tag the run as the producer of `ref` (its digest and where it lies)."""
        self.client.set_tag(run_id, "pipeline.output_sha256", ref.sha256)
        self.client.set_tag(run_id, "pipeline.output_uri", ref.uri)
        self.produced.add(ref.sha256)

    def _dataset_input(self, out: StageOutput, name: str, context: str) -> Any:
        """One dataset file of a stage output as a DatasetInput logged under `context`."""
        from mlflow.entities import DatasetInput, InputTag

        return DatasetInput(self._dataset_entity(out, name), tags=[InputTag("mlflow.data.context", context)])

    def _dataset_entity(self, out: StageOutput, name: str) -> Any:
        """The MLflow dataset of one parquet file, read once per tracker (every round consumes the same prompts)."""
        import mlflow
        import pandas as pd

        digest = out.file_digest(name)[:16]
        key = (str(out.path / name), digest)
        if key not in self._entities:
            with warnings.catch_warnings():  # MLflow's own: a source class registered twice; a schema hint
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
                ds = mlflow.data.from_pandas(pd.read_parquet(out.path / name), source=key[0], digest=digest,
                                             name=dataset_name(out, name))
                self._entities[key] = ds._to_mlflow_entity()
        return self._entities[key]

    def model_id(self, ref: ArtifactRef) -> str:
        """The LoggedModel of a model reference: found by its sha256 (here, else in another experiment), else
        created (external models, or outputs of runs that were not tracked)."""
        found = self.here_then_elsewhere(lambda ids: self.client.search_logged_models(
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

    def models_of(self, ref: ArtifactRef) -> list[Any]:
        """Every LoggedModel of this experiment (then of the others) that names the weights of `ref`."""
        return list(self.here_then_elsewhere(lambda ids: self.client.search_logged_models(
            ids, filter_string=f"tags.`pipeline.sha256` = '{ref.sha256}'", max_results=100)))

    def pruned_tag(self, ref: ArtifactRef) -> str | None:
        """The `pipeline.pruned` tag of a LoggedModel of `ref`, None when none of them has it."""
        return next((m.tags[PRUNED_TAG] for m in self.models_of(ref) if PRUNED_TAG in m.tags), None)

    def mark_pruned(self, ref: ArtifactRef, files: Collection[str]) -> None:
        """Tag (or, with no files, untag) the LoggedModels and the producing run of `ref` as pruned: the value names
        the removed folders, e.g. "model/ state/"."""
        folders = " ".join(sorted({f.split("/", 1)[0] + "/" if "/" in f else f for f in files}))
        runs = [info.run_id] if (info := self.producer(ref)) is not None else []
        for model in self.models_of(ref):
            if folders and model.tags.get(PRUNED_TAG) != folders:
                self.client.set_logged_model_tags(model.model_id, {PRUNED_TAG: folders})
            elif not folders and PRUNED_TAG in model.tags:
                self.client.delete_logged_model_tag(model.model_id, PRUNED_TAG)
        for run_id in runs:
            tagged = self.client.get_run(run_id).data.tags.get(PRUNED_TAG)
            if folders and tagged != folders:
                self.client.set_tag(run_id, PRUNED_TAG, folders)
            elif not folders and tagged is not None:
                self.client.delete_tag(run_id, PRUNED_TAG)

    def here_then_elsewhere(self, search: Callable[[list[str]], Sequence[Any]]) -> Sequence[Any]:
        """`search(experiment_ids)` in this experiment, then, if that found nothing, in every other experiment of
        the tracking server."""
        found = search([self.experiment_id])
        if len(found):
            return found
        others = [e.experiment_id for e in self.client.search_experiments(max_results=1000)
                  if e.experiment_id != self.experiment_id]
        return search(others) if others else []

    def producer(self, ref: ArtifactRef) -> Any | None:
        """The RunInfo of the (earliest) run whose output has this digest."""
        runs = self.here_then_elsewhere(lambda ids: self.client.search_runs(
            ids, filter_string=f"tags.`pipeline.output_sha256` = '{ref.sha256}'", max_results=1,
            order_by=["attributes.start_time ASC"]))
        return runs[0].info if len(runs) else None
