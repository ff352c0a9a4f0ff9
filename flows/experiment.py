"""The Prefect flow `experiment`: every trial of an experiment TOML (`pipeline.experiment.trials`) as a `post-train`
subflow run, then the report.

Each trial is the `post-train` flow with the trial's overrides of the base config, named after the trial
(`<variant>.s<seed>`), so its stages are the same cached, retried tasks as a `gft run`: stages shared between
trials, or finished in an earlier attempt, are served from the cache. A failed trial does not stop the others;
the experiment then ends Failed, with the report written and the failed trials named in it.

With `deployment` (e.g. "post-train/nightly"; `gft experiment EXP --deployment NAME`), each trial is instead a run
of that deployment of `post-train` (`run_deployment`), all submitted at once: the work pool's workers run as many
trials at a time as there are workers, against the shared run root and the MLflow server of the base config's
`[tracking] uri`. The experiment file, the base config and the run root must be at the same paths on every worker
(a shared checkout and file system). Trials still share stages: a stage two trials need at once is computed by one
and served to the other (the store's compute lock).
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from flows.post_train import post_train
from pipeline.store.artifacts import ArtifactRef
from pipeline.experiment.schema import Trial, experiment_root, load_experiment
from pipeline.experiment.trials import RunTrial, SubmitTrial, run_experiment, stored_refs

POLL_S = 2.0
"""How often a fanned-out experiment asks the server whether its trials' runs are done."""

__all__ = ["experiment"]


def _subflow(exp_base: str, root: Path, progress: bool) -> RunTrial:
    def run_trial(trial: Trial, tags: dict[str, str]) -> dict[str, ArtifactRef]:
        out = post_train.with_options(flow_run_name=trial.id)(
            config=exp_base, root=str(root), progress=progress, overrides=trial.overrides, tags=tags)
        return {name: ArtifactRef.model_validate(ref) for name, ref in out["refs"].items()}
    return run_trial


def _deployment_runs(deployment: str, exp_base: str, root: Path) -> SubmitTrial:
    """Each trial as a run of `deployment` (a subflow of this flow run in the UI), started without waiting."""
    from prefect.deployments import run_deployment

    def submit(trial: Trial, tags: dict[str, str]):
        run = run_deployment(deployment, flow_run_name=trial.id, timeout=0, parameters={
            "config": exp_base, "root": str(root), "progress": False, "overrides": trial.overrides, "tags": tags})
        get_run_logger().info("trial %s: flow run %s of %s", trial.id, run.id, deployment)
        return lambda: _finished(run.id, trial, root)
    return submit


def _finished(flow_run_id, trial: Trial, root: Path) -> dict[str, ArtifactRef]:
    """Wait for the trial's flow run to end; its stage references, read from the shared store, if it completed."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        while not (run.state and run.state.is_final()):
            time.sleep(POLL_S)
            run = client.read_flow_run(flow_run_id)
    if not run.state.is_completed():
        raise RuntimeError(f"flow run {run.name} ({run.id}) ended {run.state.name}: {run.state.message}")
    return stored_refs(trial.config, root)


@flow(name="experiment", log_prints=True)
def experiment(config: str, root: str | None = None, only: list[str] | None = None, progress: bool = True,
               deployment: str | None = None):
    """Run the experiment TOML at `config`: its trials as post-train subflows (or, with `deployment`, as runs of
    that deployment on its work pool's workers, all at once), then the table and plots."""
    exp = load_experiment(config)
    run_root = experiment_root(exp, root)
    if deployment:
        result = run_experiment(exp, run_root, submit=_deployment_runs(deployment, exp.base, run_root), only=only,
                                progress=progress)
    else:
        result = run_experiment(exp, run_root, _subflow(exp.base, run_root, progress), only=only, progress=progress)
    create_markdown_artifact(key=f"experiment-{exp.name.replace('_', '-').lower()}",
                             markdown=result.report.read_text(), description="mean ± std over seeds, per variant")
    payload = {"report": str(result.report), "plots": [str(p) for p in result.plots], "mlflow": result.mlflow_url,
               "failed": result.failed, "trials": [r.trial.id for r in result.trials]}
    get_run_logger().info("report: %s; failed trials: %s", result.report, result.failed or "none")
    if result.failed:
        return Failed(message=f"{len(result.failed)} trial(s) failed: {', '.join(result.failed)}; report "
                              f"{result.report}", data=payload)
    return payload
