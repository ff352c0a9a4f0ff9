"""The team setup, run for real (infra/README.md, "Run it on one machine"): PostgreSQL, a Prefect server and an
MLflow tracking server on it, a process work pool with two workers (tests/team_stack.py), deployments made by
`prefect deploy` from infra/prefect.yaml, runs triggered and retried through the API as the UI's buttons do,
the MLflow lineage read back from the PostgreSQL-backed server, the Prefect UI in headless Chromium, and an
experiment fanned out over the workers against one shared run root. One stack for the module (about 30 s to
start); every process stopped by its process group at the end, the ports free again."""

import json
import time
from pathlib import Path

import pytest

from tests.team_stack import REPO, TeamStack, group_members, port_is_free

pytestmark = pytest.mark.slow

TINY = REPO / "tests" / "data" / "tiny_run.toml"
POOL = "gft-process"
WORKERS = ("worker-1", "worker-2")
HOOKS = REPO / "tests" / "team_hooks"  # sitecustomize: fault injection in a worker's flow run
RUN_TIMEOUT_S = 600
GRPO_TINY = {"grpo.rounds": 1, "grpo.prompts_per_round": 2, "grpo.num_generations": 2,
             "grpo.max_response_tokens": 24, "grpo.sampling.max_new_tokens": 24, "grpo.train.micro_batch_size": 16}


def team_prefect_yaml(stack: TeamStack, root: Path) -> Path:
    """infra/prefect.yaml as a worker on this machine needs it: the pull step changes into this checkout (not the
    image's /opt/gft), and beside `nightly` a `tiny` deployment of the tiny test config, tracking to the stack's
    MLflow server, on the shared run root."""
    import yaml

    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    spec["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    tiny = {**nightly, "name": "tiny", "description": "tests/data/tiny_run.toml on the team stack",
            "tags": ["gft", "test"], "schedules": [], "concurrency_limit": None,
            "parameters": {"config": str(TINY.relative_to(REPO)), "root": str(root), "progress": False,
                           "overrides": {"tracking.uri": stack.mlflow_url, "tracking.ui_url": stack.mlflow_url}}}
    spec["deployments"] = [nightly, tiny]
    path = stack.base / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The stack with the pool, two workers (one flow run at a time each) and the deployments of prefect.yaml."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    base = tmp_path_factory.mktemp("team-stack")
    with TeamStack(base) as st, pytest.MonkeyPatch.context() as mp:
        st.work_pool(POOL)
        for name in WORKERS:
            st.worker(POOL, name)
        st.deploy_output = st.prefect(["deploy", "--prefect-file", str(team_prefect_yaml(st, base / "runs")),
                                       "--all"])
        mp.setenv("PREFECT_API_URL", st.prefect_api)  # for `gft experiment --deployment`
        with temporary_settings(updates={PREFECT_API_URL: st.prefect_api, PREFECT_UI_URL: st.prefect_ui}):
            yield st


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_final(flow_run_id, timeout_s: float = RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    with _client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s:.0f} s (state {run.state})")


def _trigger(deployment: str, **kw):
    """What the UI's Run button does: a flow run of the deployment, left to a worker."""
    with _client() as client:
        dep = client.read_deployment_by_name(deployment)
        return client.create_flow_run_from_deployment(dep.id, **kw)


def _retry(flow_run_id) -> None:
    """What the UI's Retry button does: the failed run goes back to Scheduled (AwaitingRetry), same id."""
    from prefect.states import AwaitingRetry

    with _client() as client:
        result = client.set_flow_run_state(flow_run_id, AwaitingRetry(message="Retry from the UI"), force=True)
    assert result.status.value == "ACCEPT", result


def _task_states(flow_run_id) -> list[tuple[str, str]]:
    """(task name, state name) of a flow run's task runs, in start order, every attempt of the run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    runs = sorted(runs, key=lambda r: (r.expected_start_time or r.created, r.created))
    return [(r.name.rsplit("-", 1)[0], r.state.name) for r in runs]


def _logs(flow_run_id) -> str:
    """The flow run's log lines on the server (what the UI's Logs tab shows)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client() as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _wait_process_exit(stack: TeamStack, flow_run_name: str, timeout_s: float = 60) -> None:
    """Until the worker has handled the run's process exit: the runner logs the exit, then the worker proposes
    Crashed (refused while the run is Failed) and logs the exit's resolution. A retry set before that proposal
    would be overwritten by it (seen in CI: retried 0.1 s after the exit line, then reported crashed)."""
    needle, handled = f"Process for flow run '{flow_run_name}' exited", "prefect.flow_runs.worker - Check the flow run"

    def seen() -> bool:
        logs = (p.log.read_text(errors="replace") for p in stack.procs if p.name in WORKERS)
        return any(needle in text and handled in text.split(needle, 1)[1] for text in logs)

    deadline = time.monotonic() + timeout_s
    while not seen():
        assert time.monotonic() < deadline, f"no worker handled the exit of {flow_run_name}"
        time.sleep(0.5)


def _ran_on(stack: TeamStack, flow_run_id) -> list[str]:
    """The workers whose log names the flow run (a worker logs each run it submits)."""
    return [p.name for p in stack.procs if p.name in WORKERS and str(flow_run_id) in p.log.read_text(errors="replace")]


# ---------------------------------------------------------------------------------------------------------
# the stack and the deployments
# ---------------------------------------------------------------------------------------------------------


def test_servers_store_in_postgresql_and_both_workers_poll_the_pool(stack):
    tables = {db: stack.psql(db, "select tablename from pg_tables where schemaname = 'public'")
              for db in ("prefect", "mlflow")}
    assert "flow_run" in tables["prefect"] and "deployment" in tables["prefect"]
    assert "runs" in tables["mlflow"] and "registered_models" in tables["mlflow"]
    deadline = time.monotonic() + 60
    with _client() as client:
        while {w.name for w in client.read_workers_for_work_pool(POOL)} != set(WORKERS):
            assert time.monotonic() < deadline, "both workers did not register with the pool"
            time.sleep(1)
        pool = client.read_work_pool(POOL)
    assert pool.type == "process"


def test_prefect_deploy_creates_the_deployments_of_prefect_yaml(stack):
    with _client() as client:
        tiny = client.read_deployment_by_name("post-train/tiny")
        nightly = client.read_deployment_by_name("post-train/nightly")
    assert tiny.work_pool_name == nightly.work_pool_name == POOL
    assert tiny.entrypoint == nightly.entrypoint == "flows/post_train.py:post_train"
    assert tiny.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert nightly.parameters == {"config": "configs/default.toml", "refresh": None}
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]
    assert nightly.job_variables["env"]["TOKENIZERS_PARALLELISM"] == "false"


def test_the_cron_schedule_creates_scheduled_runs(stack):
    """The server's scheduler fills `nightly`'s schedule with runs at 02:00 UTC; pausing the deployment (so that
    no worker ever starts the full default run here) removes them."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with _client() as client:
        dep = client.read_deployment_by_name("post-train/nightly")
        only = dict(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                        any_=[StateType.SCHEDULED]))))
        deadline = time.monotonic() + 60
        while not (runs := client.read_flow_runs(**only)):
            assert time.monotonic() < deadline, "the scheduler created no runs of post-train/nightly"
            time.sleep(1)
        client.pause_deployment(dep.id)
    times = sorted(r.expected_start_time for r in runs)
    assert len(runs) >= 3 and all((t.hour, t.minute, t.second) == (2, 0, 0) for t in times)
    assert all(r.state.name == "Scheduled" and r.parameters["config"] == "configs/default.toml" for r in runs)


# ---------------------------------------------------------------------------------------------------------
# a run through the API, on a worker: fails in GFT round 1, retried from the API
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_run(stack):
    """A run of post-train/tiny triggered through the API; GFT round 1 fails (the sentinel file exists) and the run
    ends Failed; the sentinel is removed and the run retried from the API, then completes. Returns its id and
    the task states after each attempt."""
    sentinel = stack.base / "fail-gft-round-1"
    sentinel.touch()
    env = {"PYTHONPATH": str(HOOKS), "GFT_TEST_FAIL_GFT_ROUND": f"1:{sentinel}"}
    run = _trigger("post-train/tiny", job_variables={"env": env})
    first = _wait_final(run.id)
    failed_states = _task_states(run.id)
    _wait_process_exit(stack, first.name)
    sentinel.unlink()
    _retry(run.id)
    second = _wait_final(run.id)
    return run.id, first, failed_states, second, _task_states(run.id)


def test_a_run_from_the_api_is_picked_up_by_a_worker(stack, worker_run):
    run_id, first, failed_states, second, states = worker_run
    assert first.state.type.value == "FAILED" and "injected failure in gft round 1" in _logs(run_id)
    assert len(_ran_on(stack, run_id)) >= 1  # a worker of the pool submitted it (both attempts)
    assert second.state.is_completed(), second.state.message
    assert second.run_count == 2 and second.parameters["config"] == "tests/data/tiny_run.toml"


def test_the_retry_executes_only_the_failed_round_onward(worker_run):
    run_id, first, failed_states, second, states = worker_run
    assert failed_states[-1] == ("gft_round", "Failed") and len(failed_states) == 8
    assert [s for _, s in failed_states[:-1]] == ["Completed"] * 7  # data .. GFT round 0
    retried = states[len(failed_states):]
    assert len(retried) == 9
    executed = [name for name, state in retried if state != "Cached"]
    assert executed == ["gft_round", "evaluate"]  # round 1 and the evaluation after GFT; the rest served
    assert retried[6] == ("gft_round", "Cached")  # round 0


def test_mlflow_lineage_from_the_postgresql_backed_server(stack, worker_run):
    from mlflow import MlflowClient

    run_id, *_ = worker_run
    client = MlflowClient(tracking_uri=stack.mlflow_url)
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}' and "
                                 "tags.`pipeline.stage` = 'pipeline'", order_by=["attributes.start_time ASC"])
    assert [(p.info.status, p.data.tags["prefect.run_count"]) for p in parents] == [("FAILED", "1"), ("FINISHED", "2")]
    parent = parents[1]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["pipeline.stage"] for c in children) == ["evaluate", "gft_round"]
    assert parent.data.tags.get("reused.sft") and parent.data.tags.get("reused.prepare_data")  # served: their makers
    prep = client.get_run(parent.data.tags["reused.prepare_data"])
    assert {d.dataset.name for d in prep.inputs.dataset_inputs} >= {"prepare_data/train", "prepare_data/eval"}
    gft = client.get_run(next(c for c in children if c.data.tags["pipeline.stage"] == "gft_round").info.run_id)
    assert gft.outputs.model_outputs and gft.inputs.model_inputs  # round 1's model, from round 0's
    assert any(d.dataset.name.endswith("/groups") for d in gft.inputs.dataset_inputs)
    version = client.get_model_version_by_alias("tiny-policy", "candidate")
    assert version.run_id == parent.info.run_id or version.tags.get("pipeline.sha256")
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/summary.md" in artifacts  # through the server's artifact proxy, into its local folder
    assert list((stack.base / "mlartifacts").rglob("summary.md"))


def test_prefect_ui_shows_the_worker_run_and_its_task_runs(stack, worker_run):
    """Headless Chromium on the Prefect UI's flow-run page of the worker-run flow: the run and its task runs."""
    import os

    from tests.browser import find_chromium, render, visible_text

    assert find_chromium(), "chromium is missing: make chromium"
    run_id, *_, states = worker_run
    out = Path(os.environ.get("GFT_TEST_OUTPUT", REPO / "test-output"))
    shot = out / "prefect-flow-run.png"
    url = f"{stack.prefect_ui}/runs/flow-run/{run_id}"
    text = visible_text(render(url, shot, wait_ms=15_000, timeout_s=180))
    with _client() as client:
        name = client.read_flow_run(run_id).name
    assert name in text and "Completed" in text
    assert f"{len(states)} Task runs" in text  # the header over the run's graph of task runs (both attempts)
    for task in ("prepare_data", "bootstrap_models", "teacher_sample", "sft", "gft_round", "evaluate"):
        assert f"{task}-" in text, task  # <task>-<suffix>: the Logs tab names the task run of each line (the
        # graph that draws them is a canvas; the page ignores ?tab=); empty if the flow process logs nothing to the API
    assert shot.stat().st_size > 20_000


# ---------------------------------------------------------------------------------------------------------
# an experiment fanned out over the workers
# ---------------------------------------------------------------------------------------------------------


def _experiment_toml(path: Path, mlflow_url: str | None) -> Path:
    """Four tiny trials, variants sft and sft_grpo at seeds 0 and 1: every trial shares the data, models and
    teacher responses; sft.sN and sft_grpo.sN share the SFT of seed N."""
    overrides = {**GRPO_TINY, **({"tracking.uri": mlflow_url, "tracking.ui_url": mlflow_url} if mlflow_url else {})}
    lines = ['name = "team_fanout"', f'base = "{TINY}"', "seeds = [0, 1]", "[overrides]"]
    lines += [f'"{k}" = {json.dumps(v)}' for k, v in overrides.items()]
    lines += ["[variants.sft]", 'chain = ["sft"]', "[variants.sft_grpo]", 'chain = ["sft", "grpo"]']
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def fanned_out(stack, tmp_path_factory):
    from flows.cli import main

    root = tmp_path_factory.mktemp("fanout-root")
    config = _experiment_toml(stack.base / "experiments" / "team_fanout.toml", stack.mlflow_url)
    start = time.monotonic()
    code = main(["experiment", str(config), "--root", str(root), "--deployment", "post-train/tiny", "--no-progress"])
    return root, code, time.monotonic() - start


def test_experiment_trials_run_at_once_on_both_workers(stack, fanned_out):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    root, code, wall_s = fanned_out
    assert code == 0
    ids = ["sft.s0", "sft_grpo.s0", "sft.s1", "sft_grpo.s1"]
    with _client() as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=ids)))
    assert sorted(r.name for r in runs) == sorted(ids) and all(r.state.is_completed() for r in runs)
    assert all(r.deployment_id for r in runs)
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # trials overlapped in time
    assert {w for r in runs for w in _ran_on(stack, r.id)} == set(WORKERS)


def test_shared_stages_are_computed_once_across_workers(stack, fanned_out):
    """Every (stage, key) has exactly one MLflow stage run: the trials that needed it at the same moment on the
    other worker waited for it (the store's compute lock) and were served; and the store verifies."""
    from collections import Counter

    from mlflow import MlflowClient

    from pipeline.store.artifacts import StageStore

    root, code, _ = fanned_out
    client = MlflowClient(tracking_uri=stack.mlflow_url)
    exp = client.get_experiment_by_name("team_fanout")
    runs = client.search_runs([exp.experiment_id], "tags.`pipeline.key` != ''", max_results=1000)
    made = Counter((r.data.tags["pipeline.stage"], r.data.tags["pipeline.key"]) for r in runs)
    assert made and max(made.values()) == 1, made.most_common(3)
    by_stage = Counter(stage for stage, _ in made)
    assert by_stage["teacher_sample"] == 1 and by_stage["bootstrap_models"] == 1 and by_stage["prepare_data"] == 1
    assert by_stage["sft"] == 2 and by_stage["grpo_round"] == 2  # one SFT per seed, shared with GRPO's trial
    store = StageStore(root)
    for stage, key in made:
        assert store.lookup(stage, key) is not None, (stage, key)
    assert not list(root.glob("*/.tmp-*[!k]"))  # no temp folder left


def test_fanned_out_report_equals_the_sequential_one(stack, fanned_out, tmp_path):
    """The same experiment in-process, one trial after the other on a fresh root (tracking in its own SQLite): the
    same table."""
    from pipeline.experiment.trials import load_experiment, local_trial, run_experiment

    root, code, _ = fanned_out
    exp = load_experiment(_experiment_toml(tmp_path / "team_fanout.toml", None))
    seq = run_experiment(exp, tmp_path / "root", local_trial(tmp_path / "root"), progress=False)
    assert not seq.failed
    fanned = json.loads((root / "reports" / "team_fanout" / "results.json").read_text())
    sequential = json.loads(seq.report.with_name("results.json").read_text())
    assert fanned["variants"] == sequential["variants"]
    assert [t["id"] for t in fanned["trials"]] == [t["id"] for t in sequential["trials"]]


# ---------------------------------------------------------------------------------------------------------
# teardown
# ---------------------------------------------------------------------------------------------------------


def test_everything_stops_by_process_group_and_the_ports_are_free(stack):
    groups = {p.name: p.popen.pid for p in stack.procs}
    assert set(groups) == {"postgres", "prefect-server", "mlflow-server", *WORKERS}
    ports = stack.ports
    stack.stop()
    assert {name: group_members(pgid) for name, pgid in groups.items() if group_members(pgid)} == {}
    assert all(port_is_free(p) for p in ports), ports


def test_experiment_deployment_without_a_server_says_what_to_set(capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    exp = REPO / "experiments" / "paper_table_ci.toml"
    assert main(["experiment", str(exp), "--deployment", "post-train/tiny", "--only", "sft"]) == 2
    assert "export PREFECT_API_URL" in capsys.readouterr().err
