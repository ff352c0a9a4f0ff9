"""The Prefect flow `post_train`: the pipeline's DAG with every stage call a cached, retried Prefect task.

    prepare_data -> bootstrap_models -> teacher_sample -> evaluate(base)
                 -> sft -> evaluate -> gft_round x R -> evaluate -> grpo_round x R -> evaluate

The DAG itself is `pipeline.run.execute` (shared with `gft run --in-process`); this module only hands it
tasks instead of functions. A task takes one bound stage call (`pipeline.stages.StageCall`: the stage, its
arguments and its spec, derived once) and is a one-line wrapper over `pipeline.stages.execute`; the tasks are made
per flow run, closing over that run's `Resources` (engines, verifiers, store, tracker), so no module state is kept.

Caching: a task's `cache_key_fn` is the call's own key (`pipeline.store.cache.StageSpec.key`: stage, code version,
settings, scalars and input digests), and its result, a small `ArtifactRef`, is persisted as JSON under
`<root>/prefect-results`. So a new flow run with the same config, or `prefect flow-run retry` of a failed one,
serves every finished stage as Cached and runs only what failed or changed. Before a call, the stage's output is
verified in the artifact store; when it is missing or altered, or when Prefect's record names other content, the
call refreshes Prefect's cache and the stage recomputes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.runtime import flow_run, task_run
from prefect.serializers import JSONSerializer

from pipeline import runtime, stages
from pipeline.config import RunConfig, load_run_config
from pipeline.run import Ops, RunResult, resolve_root, run
from pipeline.store.artifacts import ArtifactRef

__all__ = ["post_train"]

RETRIES = {"teacher_sample": 2, "evaluate": 2, "gft_round": 1, "grpo_round": 1}  # sampling stages retry; a failed step resumes


def _cache_key(ctx, params: dict) -> str:
    call: stages.StageCall = params["call"]
    return f"{call.stage}-{call.key}"


def _stage_tasks(res: runtime.Resources) -> dict[str, Any]:
    """One Prefect task per stage for this flow run, each a one-line wrapper over `stages.execute`."""
    def run_stage(call: stages.StageCall) -> ArtifactRef:
        return stages.execute(call, res)

    return {name: task(run_stage, name=name, cache_key_fn=_cache_key, persist_result=True, result_serializer="json",
                       retries=RETRIES.get(name, 0), retry_delay_seconds=5) for name in stages.STAGES}


def _results(root: Path) -> LocalFileSystem:
    return LocalFileSystem(basepath=str(root / "prefect-results"))


def _record_matches(res: runtime.Resources, stage: str, key: str, root: Path) -> bool:
    """Whether the artifact store holds a verified output for (stage, key) and Prefect's record (if any) names it:
    the same content at the same place. A root copied or moved elsewhere keeps records naming the old place; they
    are refreshed (the stage is then served from this root's store), never trusted."""
    ref = res.store.lookup(stage, key)
    if ref is None:
        return False
    store = ResultStore(result_storage=_results(root), serializer=JSONSerializer())
    prefect_key = f"{stage}-{key}"
    if not store.exists(prefect_key):
        return True
    record = store.read(prefect_key).result
    return (record.sha256, record.uri) == (ref.sha256, ref.uri)


def _ops(res: runtime.Resources, root: Path) -> Ops:
    """Stage calls through this run's tasks: verified cache (refresh when stale or forced), then an MLflow link."""
    tasks = _stage_tasks(res)

    def call(c: stages.StageCall) -> ArtifactRef:
        refresh = res.force or not _record_matches(res, c.stage, c.key, root)
        ref = tasks[c.stage].with_options(refresh_cache=refresh, result_storage=root / "prefect-results")(c)
        url = res.tracker.run_url(ref)
        if url:
            create_link_artifact(key=f"mlflow-{c.stage.replace('_', '-')}", link=url,
                                 link_text=f"MLflow run of {c.stage}", description=f"output {ref.sha256[:12]}")
        return ref
    return call


def prefect_tags() -> dict[str, str]:
    """Tags linking an MLflow run to the Prefect flow run (and task run, inside a task)."""
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
            "prefect.root_flow_run_id": flow_run.root_flow_run_id, "prefect.run_count": flow_run.run_count,
            "prefect.flow_run_url": flow_run.ui_url, "prefect.task_run_id": task_run.id}
    return {k: str(v) for k, v in tags.items() if v}


@flow(name="post-train", log_prints=True)
def post_train(config: str, refresh: str | None = None, root: str | None = None, progress: bool = True,
               overrides: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> dict:
    """Post-train a model per the RunConfig TOML at `config` with dotted-field `overrides` (an experiment's
    trial); `refresh` names the first stage to recompute; `tags` go on the MLflow parent run."""
    cfg = load_run_config(config, overrides)  # an overridden path is resolved and checked like one in the file
    run_root = resolve_root(config, cfg, root)

    result = run(cfg, root=run_root, progress=progress, ops=lambda res: _ops(res, run_root),
                 context_tags=prefect_tags, refresh=refresh, tags=tags)
    _report(result)
    return {"summary": str(result.summary_path), "calls": result.calls, "mlflow": result.mlflow_url,
            "refs": {name: ref.model_dump(mode="json") for name, ref in result.refs.items()}}


def _report(result: RunResult) -> None:
    create_markdown_artifact(key="post-train-summary", markdown=result.summary_path.read_text(),
                             description="Held-out evaluation by checkpoint, artifacts, plots")
    get_run_logger().info("summary: %s; work done: %s", result.summary_path, result.calls)
