"""pipeline/tracking: the `Tracker` protocol covers what callers use and both trackers provide it; the MLflow
tracker logs the lineage the manifests declare (datasets and contexts, inputs by role) on real MLflow (SQLite)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pandas as pd
import pytest

from pipeline.store.artifacts import ArtifactRef, StageStore, tree_sha256
from pipeline.tracking import MlflowTracker, NullTracker, Tracker, sqlite_uri

REPO = Path(__file__).resolve().parents[1]


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(Tracker).items()
            if callable(fn) and not name.startswith("_")}


def _called_tracker_methods() -> set[str]:
    """Every `<...>tracker.<method>(...)` call in pipeline/ and flows/ (outside the trackers themselves)."""
    found = set()
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("flows/**/*.py")]:
        if "tracking" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name == "tracker":
                    found.add(node.func.attr)
    return found


def test_the_protocol_declares_every_method_callers_use():
    called = _called_tracker_methods()
    assert {"start_pipeline", "stage_run", "observe", "register"} <= called  # the scan sees the callers
    assert called <= set(_protocol_methods()), f"called but not in Tracker: {sorted(called - set(_protocol_methods()))}"


@pytest.mark.parametrize("cls", [NullTracker, MlflowTracker])
def test_both_trackers_provide_every_protocol_method_with_its_parameters(cls):
    for name, sig in _protocol_methods().items():
        assert callable(getattr(cls, name, None)), f"{cls.__name__} lacks {name}"
        mine = inspect.signature(getattr(cls, name))
        assert list(mine.parameters) == list(sig.parameters), f"{cls.__name__}.{name}{mine} != Tracker.{name}{sig}"
        assert getattr(cls, name).__doc__, f"{cls.__name__}.{name} has no docstring"


def test_the_null_tracker_records_nothing(tmp_path):
    t = NullTracker()
    ref = ArtifactRef(kind="model", uri=str(tmp_path), sha256="0" * 64, schema_version=1)
    assert t.start_pipeline("p", {}, {}) is None
    with t.stage_run("sft", "k", {}, {"init": ref}) as run:
        run.finish(ref, None)
    assert (t.register(ref, "m", "a"), t.run_url(ref), t.parent_url()) == (None, None, None)


# ---------------------------------------------------------------------------------------------------------
# Lineage on real MLflow
# ---------------------------------------------------------------------------------------------------------


class _Pipeline:
    """Stage outputs written the way `runtime.cached` writes them: a child run around a store write."""

    def __init__(self, root: Path):
        self.store = StageStore(root / "runs")
        self.tracker = MlflowTracker(sqlite_uri(root / "mlflow.db"), "t", artifact_location=(root / "mla").as_uri())
        self.tracker.start_pipeline("p", {"seed": 0}, {})

    def stage(self, stage: str, kind: str, files: dict, inputs, datasets=None, metrics=None) -> ArtifactRef:
        with self.tracker.stage_run(stage, f"{stage}-key", {"x": 1}, inputs) as run:
            with self.store.write(stage, f"{stage}-key", kind=kind, version=1, config={}, inputs=inputs,
                                  datasets=datasets) as out:
                for name, value in files.items():
                    path = out.path / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    pd.DataFrame({"x": [value]}).to_parquet(path) if name.endswith(".parquet") else path.write_text(
                        value)
                out.metrics.update(metrics or {})
            run.finish(out.ref, self.store.manifest(out.ref))
        self.tracker.observe(stage, out.ref)
        return out.ref

    def datasets(self, stage: str) -> set[tuple[str, str]]:
        """(dataset name, context) of the inputs of the run of `stage`."""
        c = self.tracker.client
        run = c.search_runs([self.tracker.experiment_id], f"tags.`pipeline.stage` = '{stage}'")[0]
        return {(d.dataset.name, d.tags[0].value) for d in c.get_run(run.info.run_id).inputs.dataset_inputs}

    def model_metrics(self, ref: ArtifactRef) -> set[str]:
        return {m.key for m in self.tracker.client.get_logged_model(self.tracker.model_id(ref)).metrics or []}


def _base(pipe: _Pipeline) -> ArtifactRef:
    pair = pipe.stage("bootstrap_models", "models", {"base/model/w": "w"}, {})
    return ArtifactRef(kind="model", uri=str(pair.path / "base"), sha256=tree_sha256(pair.path / "base"),
                       schema_version=1)


def test_lineage_follows_declared_datasets_and_input_roles(tmp_path):
    pipe = _Pipeline(tmp_path)
    prompts = pipe.stage("prepare_data", "prompts", {"train.parquet": 1, "eval.parquet": 2, "hard.parquet": 3}, {},
                         {"train.parquet": "training", "eval.parquet": "evaluation", "hard.parquet": "evaluation"})
    base = _base(pipe)
    r0 = pipe.stage("gft_round", "model", {"groups.parquet": 4, "history.jsonl": '{"step": 1, "loss": 0.5}\n',
                                           "model/w": "m"}, {"prompts": prompts, "prev": base},
                    {"groups.parquet": "training"}, {"reward": 0.25})
    # roles, not positions: the evaluated model is inputs["model"] whatever the order
    pipe.stage("evaluate", "eval", {"samples.parquet": 5, "metrics.json": "{}"},
               {"base": base, "prompts": prompts, "model": r0}, {"samples.parquet": "evaluation"}, {"acc": 0.5})
    assert pipe.datasets("prepare_data") == {("prepare_data/train", "output"), ("prepare_data/eval", "output"),
                                             ("prepare_data/hard", "output")}
    assert pipe.datasets("gft_round") == {("prepare_data/train", "training"), ("gft_round/groups", "output")}
    assert pipe.datasets("evaluate") == {("prepare_data/eval", "evaluation"), ("prepare_data/hard", "evaluation"),
                                         ("evaluate/samples", "output")}
    assert pipe.model_metrics(r0) == {"eval/acc"} and pipe.model_metrics(base) == set()
    c = pipe.tracker.client
    history = c.get_metric_history(c.search_runs([pipe.tracker.experiment_id], "tags.`pipeline.stage` = "
                                                 "'gft_round'")[0].info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]
    assert c.get_run(pipe.tracker.parent_run_id).data.metrics["gft_round/reward"] == 0.25


def test_old_list_inputs_and_undeclared_datasets_log_as_before(tmp_path):
    """While runtime passes a list and declares nothing: the kind table and the stage's positional roles."""
    pipe = _Pipeline(tmp_path)
    prompts = pipe.stage("prepare_data", "prompts", {"train.parquet": 1, "eval.parquet": 2}, [])
    base = _base(pipe)
    r0 = pipe.stage("gft_round", "model", {"groups.parquet": 4, "model/w": "m"}, [prompts, base])
    pipe.stage("evaluate", "eval", {"samples.parquet": 5, "metrics.json": "{}"}, [prompts, r0, base],
               metrics={"acc": 0.5})
    assert pipe.datasets("gft_round") == {("prepare_data/train", "training"), ("gft_round/groups", "output")}
    assert pipe.datasets("evaluate") == {("prepare_data/eval", "evaluation"), ("evaluate/samples", "output")}
    assert pipe.model_metrics(r0) == {"eval/acc"} and pipe.model_metrics(base) == set()
    assert pipe.tracker.register(r0, "policy", "candidate") == "1"
    version = pipe.tracker.client.get_model_version_by_alias("policy", "candidate")
    assert version.tags["pipeline.sha256"] == r0.sha256 and version.run_id == pipe.tracker.parent_run_id
