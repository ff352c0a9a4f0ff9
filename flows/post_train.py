"""The Prefect flow `post_train`: the pipeline's DAG with every stage call a cached, retried Prefect task.

    prepare_data -> bootstrap_models -> teacher_sample -> evaluate(base)
                 -> sft -> evaluate -> gft_round x R -> evaluate -> grpo_round x R -> evaluate

The DAG itself is `pipeline.run.execute` (shared with `python -m pipeline.run`); this module only hands it
tasks instead of functions. Each task is a one-line wrapper over `pipeline.stages`.

Caching: a task's `cache_key_fn` is the stage's own key (`pipeline.stages.SPECS[stage](...).key`, i.e.
`pipeline.store.artifacts.stage_key` of stage, code version, configs and input digests), and its result, a small
`ArtifactRef`, is persisted as JSON under `<root>/prefect-results`. So a new flow run with the same config, or
`prefect flow-run retry` of a failed one, serves every finished stage as Cached and runs only what failed or
changed. Before a call, the stage's output is verified in the artifact store; when it is missing or altered,
or when Prefect's record names other content, the call refreshes Prefect's cache and the stage recomputes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.runtime import flow_run, task_run
from prefect.serializers import JSONSerializer

from pipeline import runtime, stages
from pipeline.store.artifacts import ArtifactRef
from pipeline.config import (
    DataConfig, EvalConfig, GFTConfig, GRPOConfig, RunConfig, SFTConfig, SyntheticConfig, TeacherSampleConfig,
    apply_overrides, load_toml,
)
from pipeline.run import Ops, RunResult, run

__all__ = ["post_train", "resolve_root"]

RES: runtime.Resources | None = None  # the running flow's resources (engines, reward workers, store, tracker)
RETRIES = {"teacher_sample": 2, "evaluate": 2, "gft_round": 1, "grpo_round": 1}  # sampling stages retry; a failed step resumes


def _key(stage: str) -> Callable:
    def cache_key(ctx, params: dict) -> str:
        return f"{stage}-{stages.SPECS[stage](**params, res=RES).key}"
    return cache_key


def _stage_task(stage: str):
    return task(name=stage, cache_key_fn=_key(stage), persist_result=True, result_serializer="json",
                retries=RETRIES.get(stage, 0), retry_delay_seconds=5)


@_stage_task("prepare_data")
def prepare_data(cfg: DataConfig, synth: SyntheticConfig) -> ArtifactRef:
    return stages.prepare_data(cfg, synth, RES)


@_stage_task("bootstrap_models")
def bootstrap_models(synth: SyntheticConfig) -> ArtifactRef:
    return stages.bootstrap_models(synth, RES)


@_stage_task("teacher_sample")
def teacher_sample(cfg: TeacherSampleConfig, prompts: ArtifactRef, teacher: ArtifactRef) -> ArtifactRef:
    return stages.teacher_sample(cfg, prompts, teacher, RES)


@_stage_task("sft")
def sft(cfg: SFTConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef) -> ArtifactRef:
    return stages.sft(cfg, prompts, teacher, init, RES)


@_stage_task("gft_round")
def gft_round(cfg: GFTConfig, round_idx: int, prompts: ArtifactRef, teacher: ArtifactRef | None,
              prev: ArtifactRef, seed: int = 0) -> ArtifactRef:
    return stages.gft_round(cfg, round_idx, prompts, teacher, prev, RES, seed=seed)


@_stage_task("grpo_round")
def grpo_round(cfg: GRPOConfig, round_idx: int, prompts: ArtifactRef, reference: ArtifactRef, prev: ArtifactRef,
               seed: int = 0) -> ArtifactRef:
    return stages.grpo_round(cfg, round_idx, prompts, reference, prev, RES, seed=seed)


@_stage_task("evaluate")
def evaluate(cfg: EvalConfig, prompts: ArtifactRef, model: ArtifactRef, base: ArtifactRef) -> ArtifactRef:
    return stages.evaluate(cfg, prompts, model, base, RES)


TASKS = {"prepare_data": prepare_data, "bootstrap_models": bootstrap_models, "teacher_sample": teacher_sample,
         "sft": sft, "gft_round": gft_round, "grpo_round": grpo_round, "evaluate": evaluate}


def _results(root: Path) -> LocalFileSystem:
    return LocalFileSystem(basepath=str(root / "prefect-results"))


def _record_matches(stage: str, key: str, root: Path) -> bool:
    """Whether the artifact store holds a verified output for (stage, key) and Prefect's record (if any) names it."""
    ref = RES.store.lookup(stage, key)
    if ref is None:
        return False
    store = ResultStore(result_storage=_results(root), serializer=JSONSerializer())
    prefect_key = f"{stage}-{key}"
    return not store.exists(prefect_key) or store.read(prefect_key).result.sha256 == ref.sha256


def _call(t, root: Path) -> Callable[..., ArtifactRef]:
    """A stage call through task `t`: verified cache (refresh when stale or forced), then an MLflow link."""
    def call(*args, **kw) -> ArtifactRef:
        spec = stages.SPECS[t.name](*args, res=RES, **kw)
        refresh = RES.force or not _record_matches(t.name, spec.key, root)
        ref = t.with_options(refresh_cache=refresh, result_storage=root / "prefect-results")(*args, **kw)
        url = RES.tracker.run_url(ref)
        if url:
            create_link_artifact(key=f"mlflow-{t.name.replace('_', '-')}", link=url,
                                 link_text=f"MLflow run of {t.name}", description=f"output {ref.sha256[:12]}")
        return ref
    return call


def prefect_tags() -> dict[str, str]:
    """Tags linking an MLflow run to the Prefect flow run (and task run, inside a task)."""
    tags = {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
            "prefect.root_flow_run_id": flow_run.root_flow_run_id, "prefect.run_count": flow_run.run_count,
            "prefect.flow_run_url": flow_run.ui_url, "prefect.task_run_id": task_run.id}
    return {k: str(v) for k, v in tags.items() if v}


def resolve_root(config: str | Path, cfg: RunConfig, root: str | None = None) -> Path:
    """The run root: `root` if given, else the config's `root` relative to the config file's folder."""
    return Path(root).resolve() if root else (Path(config).resolve().parent / cfg.root).resolve()


@flow(name="post-train", log_prints=True)
def post_train(config: str, refresh: str | None = None, root: str | None = None, progress: bool = True,
               overrides: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> dict:
    """Post-train a model per the RunConfig TOML at `config` with dotted-field `overrides` (an experiment's
    trial); `refresh` names the first stage to recompute; `tags` go on the MLflow parent run."""
    global RES
    cfg = apply_overrides(load_toml(RunConfig, config), overrides or {}, where=f"{config} overrides")
    run_root = resolve_root(config, cfg, root)

    def ops(res: runtime.Resources) -> Ops:
        global RES
        RES = res
        calls = {name: _call(t, run_root) for name, t in TASKS.items()}
        return Ops(**{f.name: calls.get(f.name) for f in fields(Ops)})

    try:
        result = run(cfg, root=run_root, progress=progress, ops=ops, context_tags=prefect_tags, refresh=refresh,
                     tags=tags)
    finally:
        RES = None
    _report(result)
    return {"summary": str(result.summary_path), "calls": result.calls, "mlflow": result.mlflow_url,
            "refs": {name: ref.model_dump(mode="json") for name, ref in result.refs.items()}}


def _report(result: RunResult) -> None:
    create_markdown_artifact(key="post-train-summary", markdown=result.summary_path.read_text(),
                             description="Held-out evaluation by checkpoint, artifacts, plots")
    get_run_logger().info("summary: %s; work done: %s", result.summary_path, result.calls)
