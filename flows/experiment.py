"""The Prefect flow `experiment`: every trial of an experiment TOML (`pipeline.experiment.trials`) as a `post-train`
subflow run, then the report.

Each trial is the `post-train` flow with the trial's overrides of the base config, named after the trial
(`<variant>.s<seed>`), so its stages are the same cached, retried tasks as a `gft run`: stages shared between
trials, or finished in an earlier attempt, are served from the cache. A failed trial does not stop the others;
the experiment then ends Failed, with the report written and the failed trials named in it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from flows.post_train import post_train
from pipeline.store.artifacts import ArtifactRef
from pipeline.experiment.trials import RunTrial, Trial, experiment_root, load_experiment, run_experiment

__all__ = ["experiment"]


def _subflow(exp_base: str, root: Path, progress: bool) -> RunTrial:
    def run_trial(trial: Trial, tags: dict[str, str]) -> dict[str, ArtifactRef]:
        out = post_train.with_options(flow_run_name=trial.id)(
            config=exp_base, root=str(root), progress=progress, overrides=trial.overrides, tags=tags)
        return {name: ArtifactRef.model_validate(ref) for name, ref in out["refs"].items()}
    return run_trial


@flow(name="experiment", log_prints=True)
def experiment(config: str, root: str | None = None, only: list[str] | None = None, progress: bool = True):
    """Run the experiment TOML at `config`: its trials as post-train subflows, then the table and plots."""
    exp = load_experiment(config)
    run_root = Path(root).resolve() if root else experiment_root(exp)
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
