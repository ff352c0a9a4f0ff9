"""The Prefect flow under `prefect_test_harness`: rerun from cache after a failure (new run and `prefect flow-run
retry`), a run that executes nothing, `--refresh`, MLflow lineage, the CLI's dry run, and the MLflow UI in
headless Chromium. Prefect's home and result storage point at temp folders (set before prefect is imported)."""

import os
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="gft-prefect-home-"))
os.environ.update(PREFECT_HOME=str(_HOME), PREFECT_LOCAL_STORAGE_PATH=str(_HOME / "storage"),
                  PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
                  PREFECT_LOGGING_TO_API_ENABLED="false")

import json
import signal
import subprocess
import sys

import pytest

from tests.figures import assert_draws

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_run.toml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def _task_states(flow_run_id) -> list[tuple[str, str]]:
    """(task name, final state name) of a flow run's task runs, in start order, latest attempt only."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    runs = sorted(runs, key=lambda r: (r.expected_start_time or r.created, r.created))
    return [(r.name.rsplit("-", 1)[0], r.state.name) for r in runs]


def _link_artifacts(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    found = sorted(found, key=lambda a: a.created)  # link artifacts come back with type "markdown" on 3.7
    return {a.key: str(a.data) for a in found if (a.key or "").startswith("mlflow-")}


def _flow(root: Path, **kw):
    from flows.post_train import post_train

    return post_train(config=str(TINY), root=str(root), progress=False, return_state=True, **kw)


def _executed(states) -> list[str]:
    return [name for name, state in states if state != "Cached"]


def _fail_round(monkeypatch, failing_round: int) -> None:
    import functools
    from dataclasses import replace

    from pipeline import stages

    real = stages.STAGES["gft_round"]

    @functools.wraps(real.fn)  # the same signature, so the call binds and keys as the real stage
    def failing(job, cfg, round_idx, *args, **kw):
        if round_idx == failing_round:
            raise RuntimeError(f"injected failure in gft round {round_idx}")
        return real.fn(job, cfg, round_idx, *args, **kw)

    monkeypatch.setitem(stages.STAGES, "gft_round", replace(real, fn=failing))


@pytest.fixture(scope="module")
def failed_then_rerun(harness, tmp_path_factory):
    """Run 1 fails in GFT round 1; run 2 (same config, new flow run) completes; run 3 executes nothing."""
    root = tmp_path_factory.mktemp("flow-root")
    with pytest.MonkeyPatch.context() as mp:
        _fail_round(mp, 1)
        first = _flow(root)
    second = _flow(root)
    third = _flow(root)
    return root, first, second, third


def test_failed_stage_reruns_alone(failed_then_rerun):
    root, first, second, third = failed_then_rerun
    assert first.is_failed() and "injected failure" in str(first.message) + repr(first)
    states = _task_states(first.state_details.flow_run_id)
    assert [s for _, s in states if s == "Failed"] == ["Failed"] and states[-1][0] == "gft_round"
    assert second.is_completed()
    done = _task_states(second.state_details.flow_run_id)
    assert _executed(done) == ["gft_round", "evaluate"]  # round 1 and the evaluation after GFT
    assert [name for name, s in done].count("gft_round") == 2 and done[6] == ("gft_round", "Cached")
    assert second.result()["calls"]["gft_round"] == 1 and "sft" not in second.result()["calls"]


def test_third_run_executes_nothing(failed_then_rerun):
    root, first, second, third = failed_then_rerun
    states = _task_states(third.state_details.flow_run_id)
    assert len(states) == 9 and _executed(states) == []
    assert third.result()["calls"] == {}
    assert third.result()["refs"] == second.result()["refs"]


def test_a_copied_root_serves_its_own_files_not_the_old_roots(failed_then_rerun, tmp_path):
    """Prefect's records in a copied root name the old root's folders (same sha256): they are refreshed, and every
    stage is served from the copy, computing nothing."""
    import shutil

    root, *_ = failed_then_rerun
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    state = _flow(moved)
    out = state.result()
    assert out["calls"] == {}
    uris = [ref["uri"] for ref in out["refs"].values()]
    assert uris and all(Path(uri).is_relative_to(moved) for uri in uris), uris


def test_altered_output_is_recomputed_not_served(failed_then_rerun):
    """Prefect's record says Cached, but the artifact store's files no longer match: the stage recomputes."""
    root, *_ = failed_then_rerun
    model = next((root / "sft").glob("*/model/model.safetensors"))
    model.write_bytes(model.read_bytes()[:-8] + b"\0" * 8)
    state = _flow(root)
    states = _task_states(state.state_details.flow_run_id)
    assert _executed(states) == ["sft"]  # same training, same bytes: everything after is served again
    assert state.result()["calls"] == {"sft": 1, "optimizer.step": 2}


def test_refresh_recomputes_stage_and_downstream(failed_then_rerun):
    root, *_ = failed_then_rerun
    state = _flow(root, refresh="gft")
    states = _task_states(state.state_details.flow_run_id)
    assert _executed(states) == ["gft_round", "gft_round", "evaluate"]
    assert state.result()["calls"]["gft_round"] == 2


def test_prefect_flow_run_retry_reruns_only_the_failed_stage(harness, tmp_path, monkeypatch):
    _fail_round(monkeypatch, 0)
    first = _flow(tmp_path)
    assert first.is_failed() and "injected failure in gft round 0" in str(first.message)
    monkeypatch.undo()
    flow_run_id = first.state_details.flow_run_id
    env = {**os.environ, "PREFECT_API_URL": harness, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "retry", str(flow_run_id),
                           "--entrypoint", "flows/post_train.py:post_train"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = _task_states(flow_run_id)  # both attempts: 7 task runs (the last one failed), then 9
    assert len(states) == 16 and states[6] == ("gft_round", "Failed")
    assert _executed(states[7:]) == ["gft_round", "gft_round", "evaluate"]  # the rest served as Cached


def test_mlflow_lineage(failed_then_rerun):
    from mlflow import MlflowClient

    root, first, second, third = failed_then_rerun
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`pipeline.stage` = 'pipeline'")
    flow_ids = {r.data.tags.get("prefect.flow_run_id") for r in parents}
    assert str(second.state_details.flow_run_id) in flow_ids
    parent = next(r for r in parents if r.data.tags["prefect.flow_run_id"] == str(second.state_details.flow_run_id))
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["pipeline.stage"] for c in children) == ["evaluate", "gft_round"]
    assert all(c.data.tags.get("prefect.task_run_id") for c in children)
    assert parent.data.tags.get("reused.sft")  # served from cache: points at the run that made it
    prep = client.search_runs([exp.experiment_id], "tags.`pipeline.stage` = 'prepare_data'")[0]
    names = {d.dataset.name: d.dataset.digest for d in prep.inputs.dataset_inputs}
    manifest = json.loads(Path(prep.data.tags["pipeline.output_uri"], "manifest.json").read_text())
    assert names["prepare_data/train"] == manifest["files"]["train.parquet"][:16]
    assert names["prepare_data/eval"] == manifest["files"]["eval.parquet"][:16]
    gft = client.get_run([c for c in children if c.data.tags["pipeline.stage"] == "gft_round"][0].info.run_id)
    assert gft.outputs.model_outputs and gft.inputs.model_inputs  # round 1's model, from round 0's
    assert any(d.dataset.name.endswith("/groups") for d in gft.inputs.dataset_inputs)
    history = client.get_metric_history(gft.info.run_id, "train/loss")
    assert [m.step for m in history] == [3, 4]
    links = _link_artifacts(second.state_details.flow_run_id)  # Prefect -> MLflow: each stage's run
    assert f"/runs/{gft.info.run_id}" in links["mlflow-gft-round"]
    assert f"/runs/{prep.info.run_id}" in links["mlflow-prepare-data"]  # a cached stage links to its maker
    version = client.get_model_version_by_alias("tiny-policy", "candidate")
    final = json.loads((Path(second.result()["refs"]["gft"]["uri"]) / "manifest.json").read_text())["output"]
    assert version.tags["pipeline.sha256"] == final["sha256"]


def test_dry_run_prints_keys_and_runs_nothing(failed_then_rerun, capsys):
    from flows.cli import main
    from pipeline import stages
    from pipeline.config import RunConfig, load_toml

    root, *_ = failed_then_rerun
    before = sorted(p.name for p in root.iterdir())
    assert main(["run", str(TINY), "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_toml(RunConfig, TINY)
    key = stages.bind("prepare_data", cfg.data, *stages.prepare_data_inputs(cfg.data, cfg.synthetic)).key
    assert f"prepare_data       prepare_data       cached   {key}" in out
    assert out.count("gft_round") == 2 and '"tau": 0.5' in out
    assert sorted(p.name for p in root.iterdir()) == before


def test_mlflow_ui_in_headless_chromium(failed_then_rerun, tmp_path):
    """`gft ui` serves the run root's MLflow database; Chromium sees the parent, the stage runs and datasets."""
    from mlflow import MlflowClient

    from tests.browser import find_chromium, mlflow_urls, render, visible_text, wait_http

    find_chromium()  # fails with the install hint when chromium is missing
    root, first, second, third = failed_then_rerun
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    parent = client.search_runs([exp.experiment_id], "tags.`pipeline.stage` = 'pipeline'",
                                order_by=["attributes.start_time ASC"])[0]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--root", str(root), "--port", str(port)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc, timeout_s=240)
        urls = mlflow_urls(f"http://127.0.0.1:{port}", exp.experiment_id, parent.info.run_id)
        out = Path(os.environ.get("GFT_TEST_OUTPUT", REPO / "test-output"))
        run_page = visible_text(render(urls["run"], out / "mlflow-parent-run.png"))
        runs_page = visible_text(render(urls["runs"], out / "mlflow-runs.png"))
    finally:
        _stop_group(proc, signal.SIGTERM)  # gft ui stops its servers on SIGTERM as on Ctrl-C
    printed = proc.stdout.read()
    assert f"experiment tiny: http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}?workflowType=" in printed
    assert parent.info.run_name in run_page and "Child runs" in run_page
    assert "Model registry" in run_page and "Judges" not in run_page  # the Model training view, not GenAI's
    for stage in ("prepare_data", "bootstrap_models", "teacher_sample", "sft", "gft_round", "evaluate"):
        assert stage in runs_page
    assert "/train (" in runs_page and "/groups (" in runs_page  # dataset inputs with their digests
    assert (out / "mlflow-parent-run.png").stat().st_size > 10_000


def _stop_group(proc: subprocess.Popen, sig: int, timeout_s: float = 60) -> None:
    """Signal the process group a test started, then SIGKILL it if it is still running after `timeout_s` (a
    process started from a non-interactive shell's background job inherits SIGINT ignored)."""
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gft_serve_creates_a_scheduled_deployment(harness):
    """`gft serve CONFIG --cron ...` against a Prefect server: a deployment of post-train with that schedule."""
    env = {**os.environ, "PREFECT_API_URL": harness}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gft"), "serve", str(TINY), "--cron", "0 2 * * *",
                             "--name", "nightly-test"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deployment = _wait_for_deployment("post-train/nightly-test", proc)
    finally:
        _stop_group(proc, signal.SIGINT)  # Ctrl-C
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.parameters["config"] == str(TINY)


def _wait_for_deployment(name: str, proc, timeout_s: float = 240):
    import time

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise TimeoutError(f"no deployment {name} after {timeout_s} s")


def test_gft_serve_without_a_server_says_how_to_start_one(capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["serve", str(TINY), "--cron", "0 2 * * *"]) == 2
    assert "gft ui --prefect" in capsys.readouterr().err


def test_embedded_default_end_to_end(harness, tmp_path):
    """configs/default.toml as users run it (`make run`), under the harness: every stage, every evaluation."""
    from flows.post_train import post_train
    from pipeline.config import RunConfig, load_toml

    config = REPO / "configs" / "default.toml"
    cfg = load_toml(RunConfig, config)
    state = post_train(config=str(config), root=str(tmp_path), progress=False, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert set(out["refs"]) >= {"prompts", "base", "teacher", "eval/base"} | {f"eval/{s}" for s in cfg.chain}
    summary = Path(out["summary"]).read_text()
    for checkpoint in ("base", *cfg.chain):
        assert f"| {checkpoint} |" in summary
    for name in ("accuracy.png", "training.png", "rewards.png"):
        assert_draws(Path(out["summary"]).parent / name, ("C0", "C1"))
    metrics = json.loads((Path(out["refs"][f"eval/{cfg.chain[-1]}"]["uri"]) / "metrics.json").read_text())
    assert 0.0 <= metrics["greedy_accuracy"] <= 1.0 and metrics["kl_base_policy"] > 0
    states = _task_states(state.state_details.flow_run_id)
    training_tasks = sum(1 if s == "sft" else getattr(cfg, s).rounds for s in cfg.chain)
    assert len(states) == 4 + training_tasks + len(cfg.chain)  # data, models, teacher, eval(base); stages; evals
    assert all(state == "Completed" for _, state in states)


def test_paper_table_ci_experiment(harness, tmp_path):
    """`gft experiment experiments/paper_table_ci.toml` (every variant and sweep point of the paper table, tiny
    sizes, one seed): each variant has its metrics, the plots exist, and every trial is a post-train subflow
    whose MLflow run is a child of the experiment's parent run. No claim about which variant wins."""
    from flows.cli import main
    from pipeline.experiment.schema import expand, load_experiment

    config = REPO / "experiments" / "paper_table_ci.toml"
    assert main(["experiment", str(config), "--root", str(tmp_path), "--no-progress"]) == 0
    exp = load_experiment(config)
    trials = expand(exp)
    out = tmp_path / "reports" / exp.name
    table = json.loads((out / "results.json").read_text())
    assert set(table["variants"]) == {t.variant for t in trials}
    for name, row in table["variants"].items():
        for col in ("mean@2", "pass@2", "greedy_accuracy"):
            assert 0.0 <= row[col][0] <= 1.0, (name, col)
        for col in ("entropy", "kl_base_policy"):  # the sampled KL estimate may dip below 0 by rounding
            assert row[col][0] > -1e-4 and row[col][0] < float("inf"), (name, col)
        if "gft" in row["chain"]:
            assert 0.0 <= row["rectified_frac"][0] <= 1.0, name
    for name in ("accuracy_vs_prompts.png", "steps.png", "sweep_composition.png", "sweep_tau.png"):
        assert_draws(out / name)
    assert not [t for t in table["trials"] if t["error"]]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    xp = client.get_experiment_by_name(exp.name)
    parent = client.search_runs([xp.experiment_id], filter_string="tags.`pipeline.stage` = 'experiment'")[0]
    children = client.search_runs([xp.experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(trials) and parent.info.status == "FINISHED"
    assert {c.data.tags["prefect.flow_run_name"] for c in children} == {t.id for t in trials}  # Prefect subflows
