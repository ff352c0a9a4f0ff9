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

REPO = Path(__file__).resolve().parents[2]


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

    def stage(self, stage: str, kind: str, files: dict, inputs, datasets=None, metrics=None,
              key: str | None = None) -> ArtifactRef:
        key = key or f"{stage}-key"
        with self.tracker.stage_run(stage, key, {"x": 1}, inputs) as run:
            with self.store.write(stage, key, kind=kind, version=1, config={}, inputs=inputs,
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


def test_the_models_of_pruned_rounds_are_marked_and_unmarked_once_recomputed(tmp_path):
    """Issue 26 item 7: a pruned round's LoggedModel pointed at deleted weights with nothing saying so. The run's end
    tags the model and the run of every round it saw that retention pruned; a recomputed round loses the tag."""
    pipe = _Pipeline(tmp_path)
    files = {"history.jsonl": '{"step": 1, "loss": 0.5}\n', "model/w": "m", "state/opt": "o"}
    r0 = pipe.stage("gft_round", "model", files, {}, key="k0")
    r1 = pipe.stage("gft_round", "model", {**files, "model/w": "m1"}, {"prev": r0}, key="k1")
    pipe.store.prune(r0, ["state/", "model/"])
    pipe.tracker.end_pipeline("FINISHED")
    lineage = pipe.tracker.lineage
    assert lineage.pruned_tag(r0) == "model/ state/" and lineage.pruned_tag(r1) is None
    run = pipe.tracker.client.get_run(pipe.tracker.producer_run(r0))
    assert run.data.tags["pipeline.pruned"] == "model/ state/"
    again = _Pipeline(tmp_path)  # the next run recomputes round 0 (same key, same bytes) and sees it complete
    assert again.stage("gft_round", "model", files, {}, key="k0") == r0 and not again.store.pruned(r0)
    again.tracker.end_pipeline("FINISHED")
    assert again.tracker.lineage.pruned_tag(r0) is None
    assert "pipeline.pruned" not in again.tracker.client.get_run(again.tracker.producer_run(r0)).data.tags


@pytest.mark.parametrize("made_by", ["run", "ui"])
def test_a_moved_or_copied_root_writes_its_artifacts_only_inside_itself(tmp_path, made_by):
    """Issue 26 item 5: the root's mlflow.db named file://<old root>/mlartifacts, so a run on the moved root wrote
    its config, report and plots under the old place, recreating it. On open it is re-pointed at its own folder,
    also when the database was made by `gft ui`'s server (whose default artifact root is a proxy URI)."""
    import shutil

    from pipeline.tracking.runs import create_sqlite_store

    old, new = tmp_path / "old", tmp_path / "moved" / "root"
    if made_by == "ui":
        create_sqlite_store(old / "mlflow.db", "mlflow-artifacts:/")

    def run_on(root: Path) -> MlflowTracker:
        tracker = MlflowTracker(sqlite_uri(root / "mlflow.db"), "exp", artifact_location=(root / "mlartifacts").as_uri())
        tracker.start_pipeline("p", {"seed": 0}, {})
        (root / "summary.md").write_text(f"# {root}")
        tracker.log_artifact(root / "summary.md", "report")
        tracker.end_pipeline("FINISHED")
        return tracker

    first = run_on(old).parent_run_id
    shutil.copytree(old, tmp_path / "copy")
    new.parent.mkdir()
    old.rename(new)
    tracker = run_on(new)
    assert not old.exists(), sorted(str(p) for p in old.rglob("*"))
    client = tracker.client
    for run_id in (first, tracker.parent_run_id):
        uri = client.get_run(run_id).info.artifact_uri
        assert uri.startswith((new / "mlartifacts").as_uri()), uri
        assert {f.path for f in client.list_artifacts(run_id, "report")} == {"report/summary.md"}
    assert client.get_experiment(tracker.experiment_id).artifact_location == (new / "mlartifacts").as_uri()
    copy = run_on(tmp_path / "copy")  # the copy, beside the moved root: it too writes only inside itself
    assert copy.client.get_run(copy.parent_run_id).info.artifact_uri.startswith((tmp_path / "copy").as_uri())
    assert len(list((new / "mlartifacts").rglob("summary.md"))) == 2 and not old.exists()


# ---------------------------------------------------------------------------------------------------------
# Leftovers: registration of unchanged weights, runs of killed processes, telemetry
# ---------------------------------------------------------------------------------------------------------


def test_a_cached_rerun_registers_no_new_version_of_the_same_weights(tmp_path):
    pipe = _Pipeline(tmp_path)
    model = pipe.stage("sft", "model", {"model/w": "weights"}, {})
    assert pipe.tracker.register(model, "m-policy", "candidate") == "1"
    rerun = _Pipeline(tmp_path)  # a new pipeline run serving the same output
    assert rerun.tracker.register(model, "m-policy", "candidate") == "1"
    other = rerun.stage("gft_round", "model", {"model/w": "new weights"}, {})
    assert rerun.tracker.register(other, "m-policy", "candidate") == "2"
    client = rerun.tracker.client
    assert len(client.search_model_versions("name='m-policy'")) == 2
    assert str(client.get_model_version_by_alias("m-policy", "candidate").version) == "2"


def test_runs_of_a_killed_process_are_marked_killed_on_the_next_start(tmp_path):
    """A process that dies with its runs open (kill -9) leaves them RUNNING; the next start on the same tracking
    store marks them KILLED, and leaves a live process's runs alone."""
    import subprocess
    import sys

    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from tests.integration.test_tracking import _Pipeline; "
              f"from pathlib import Path; p = _Pipeline(Path({str(tmp_path)!r})); "
              "cm = p.tracker.stage_run('sft', 'k', {}, {}); cm.__enter__(); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)  # exits without ending its runs
    pipe = _Pipeline(tmp_path)  # starts a new parent run: reaps the dead one's
    client = pipe.tracker.client
    runs = client.search_runs([pipe.tracker.experiment_id])
    statuses = {r.info.run_id: r.info.status for r in runs}
    assert statuses.pop(pipe.tracker.parent_run_id) == "RUNNING"  # this live process's own run
    assert sorted(statuses.values()) == ["KILLED", "KILLED"]  # the dead process's parent and child


def test_mlflow_telemetry_is_off_unless_the_user_opts_in():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    probe = "import pipeline, os; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "true"
    env["MLFLOW_DISABLE_TELEMETRY"] = "false"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "false"  # an explicit choice stands


# ---------------------------------------------------------------------------------------------------------
# The MLflow database of a fresh root: created aside, under a lock
# ---------------------------------------------------------------------------------------------------------

_START = ("import sys; sys.path.insert(0, {repo!r}); from pathlib import Path; "
          "from pipeline.tracking import MlflowTracker, sqlite_uri; "
          "MlflowTracker(sqlite_uri(Path({root!r}) / 'mlflow.db'), 'exp').start_pipeline('p', {{}}, {{}})")


def _starter(root: Path):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _START.format(repo=str(REPO), root=str(root))],
                            stderr=subprocess.PIPE, text=True)


def test_two_runs_starting_together_on_a_fresh_root_both_start(tmp_path):
    procs = [_starter(tmp_path), _starter(tmp_path)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    client = MlflowTracker(sqlite_uri(tmp_path / "mlflow.db"), "exp").client
    assert len(client.search_runs([client.get_experiment_by_name("exp").experiment_id])) == 2


def test_a_kill_while_the_database_is_created_leaves_the_root_usable(tmp_path):
    """kill -9 the first run while it migrates the database (its aside file exists): no mlflow.db is left
    half-made, and the next run on the root starts."""
    import signal
    import time

    proc = _starter(tmp_path)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".mlflow.db.new-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the creator finished before the kill"
    assert not (tmp_path / "mlflow.db").exists()
    tracker = MlflowTracker(sqlite_uri(tmp_path / "mlflow.db"), "exp")
    tracker.start_pipeline("p", {}, {})
    tracker.end_pipeline("FINISHED")
    assert not list(tmp_path.glob(".mlflow.db.new-*"))


def test_a_tracking_server_that_does_not_answer_fails_in_seconds_naming_it():
    import socket
    import time

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(ConnectionError, match=f"tracking server at {uri} does not answer"):
            MlflowTracker(uri, "exp")
        assert time.perf_counter() - start < 15
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused at once
    with pytest.raises(ConnectionError, match=uri):
        MlflowTracker(uri, "exp")
