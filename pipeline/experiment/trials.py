"""Experiments, the runner: every trial of an experiment (`pipeline.experiment.schema`) as a pipeline run from the
same base model and seeds, then the report (`pipeline.experiment.report`), all logged to one MLflow parent run.

    gft experiment experiments/paper_table.toml [--dry-run] [--only gft,sft]   (Prefect: flows.experiment)
    gft experiment experiments/paper_table.toml --in-process                    (in this process, no Prefect)

All trials share one artifact store (by default the base config's root, so `gft run` and the experiment serve
each other's stages): what several trials have in common (the bootstrap models, teacher responses, the SFT
before GRPO, an identical sweep point) runs once, and a rerun of the experiment computes only what is missing.
A failed trial does not stop the others: it is listed in the report and the experiment ends as failed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.experiment.report import own_overrides, short, write_report
from pipeline.experiment.schema import (
    ExperimentConfig, ExperimentResult, Trial, TrialResult, expand, experiment_root, load_experiment,
)
from pipeline.progress import bar
from pipeline.store.artifacts import ArtifactRef

__all__ = ["RunTrial", "SubmitTrial", "run_experiment", "local_trial", "stored_refs", "OpenedExperiment", "open_experiment",
           "print_plan", "where_to_look", "load_experiment", "expand"]

log = logging.getLogger(__name__)

RunTrial = Callable[[Trial, dict[str, str]], dict[str, ArtifactRef]]
"""Run a trial (a pipeline run with these MLflow tags on its parent run) and return its stage references."""
SubmitTrial = Callable[[Trial, dict[str, str]], Callable[[], dict[str, ArtifactRef]]]
"""Start a trial elsewhere (a deployment run on a worker) without waiting; returns a function that waits for it and
returns its stage references (`stored_refs`), raising when it did not complete."""


def run_experiment(exp: ExperimentConfig, root: Path, run_trial: RunTrial | None = None, *,
                   submit: SubmitTrial | None = None, only: Iterable[str] | None = None,
                   progress: bool = True) -> ExperimentResult:
    """Run every trial through `run_trial(trial, mlflow_tags)` (a pipeline run), one after the other, or with
    `submit` start them all first and then wait for each (they run at once, one per free worker); then write and log
    the report. Each trial's MLflow run is a child of the experiment's parent run."""
    from pipeline.run import make_tracker

    if (run_trial is None) == (submit is None):
        raise ValueError("run_experiment: pass either run_trial (one after the other) or submit (fanned out)")
    trials = expand(exp, only=only)
    first = trials[0].config
    tracker = make_tracker(first, root)
    parent = tracker.start_pipeline(f"experiment-{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                    exp.model_dump(mode="json"), {"pipeline.stage": "experiment"})
    try:
        if submit is not None:
            results = _fan_out(exp, trials, submit, parent, progress)
        else:
            results = [_run_one(trial, run_trial, _trial_tags(trial, parent))
                       for trial in bar(trials, desc=f"experiment {exp.name}", unit="trial", disable=not progress)]
        out = write_report(exp, results, root / "reports" / exp.name)
        for path in [out.report, out.table_json, *out.plots]:
            tracker.log_artifact(path, "report")
        tracker.log_metrics(out.flat_metrics)
    except BaseException:
        tracker.end_pipeline("FAILED")
        raise
    failed = [r.trial.id for r in results if r.error]
    tracker.end_pipeline("FAILED" if failed else "FINISHED")
    return ExperimentResult(results, out.report, out.plots, tracker.parent_url(), failed)


def _trial_tags(trial: Trial, parent: str | None) -> dict[str, str]:
    tags = {"experiment.variant": trial.variant, "experiment.seed": str(trial.seed),
            "experiment.group": trial.group, "experiment.overrides": json.dumps(trial.overrides)[:5000],
            **({"experiment.point": trial.tag} if trial.tag else {})}
    return {**tags, "mlflow.parentRunId": parent} if parent else tags


def _run_one(trial: Trial, run_trial: RunTrial, tags: dict[str, str], start: float | None = None) -> TrialResult:
    start = time.perf_counter() if start is None else start
    try:
        refs = run_trial(trial, tags)
    except Exception as exc:  # reported in the table and in the experiment's final status, never swallowed
        log.exception("trial %s failed", trial.id)
        return TrialResult(trial, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    return TrialResult(trial, refs, None, time.perf_counter() - start)


def _fan_out(exp: ExperimentConfig, trials: list[Trial], submit: SubmitTrial, parent: str | None,
             progress: bool) -> list[TrialResult]:
    """Submit every trial, then wait for each in order; a trial's wall time runs from the submission to its end."""
    start = time.perf_counter()
    waits: dict[str, Callable[[], dict[str, ArtifactRef]] | Exception] = {}
    for trial in trials:
        try:
            waits[trial.id] = submit(trial, _trial_tags(trial, parent))
        except Exception as exc:  # this trial is reported as failed; the others still run
            waits[trial.id] = exc

    def wait(trial: Trial, tags: dict[str, str]) -> dict[str, ArtifactRef]:
        waiting = waits[trial.id]
        if isinstance(waiting, Exception):
            raise waiting
        return waiting()
    return [_run_one(t, wait, {}, start)
            for t in bar(trials, desc=f"experiment {exp.name} (fanned out)", unit="trial", disable=not progress)]


def stored_refs(cfg: RunConfig, root: Path) -> dict[str, ArtifactRef]:
    """The stage references of a run finished elsewhere (a worker) on the shared store `root`: its DAG walked
    through verified lookups, computing nothing. Raises ArtifactError naming the first stage without an output."""
    from pipeline import runtime
    from pipeline.run import execute
    from pipeline.store.artifacts import ArtifactError, StageStore

    res = runtime.Resources(StageStore(root), progress=False)

    def lookup(call) -> ArtifactRef:
        ref = res.store.lookup(call.stage, call.key)
        if ref is None:
            raise ArtifactError(f"{root}: no verified output of {call.stage} (key {call.key[:12]}...) for run "
                                f"{cfg.name!r}; did its run complete on this store?")
        return ref

    try:
        return execute(cfg, lookup, res)
    finally:
        res.close()


def local_trial(root: Path, progress: bool = False) -> RunTrial:
    """Run a trial in this process (`pipeline.run.run`), without Prefect."""
    from pipeline.run import run

    def run_trial(trial: Trial, tags: dict[str, str]) -> dict[str, ArtifactRef]:
        return run(trial.config, root=root, progress=progress, tags=tags).refs
    return run_trial


@dataclass(frozen=True)
class OpenedExperiment:
    """What the command line takes: the experiment, its store, and the variants or sweeps to run (None: all)."""

    exp: ExperimentConfig
    root: Path
    only: list[str] | None


def open_experiment(config: Path, root: Path | None, only: str | None) -> OpenedExperiment:
    """The experiment file, its store (`root`, else the experiment's own) and the comma-separated `only`."""
    exp = load_experiment(config)
    return OpenedExperiment(exp, experiment_root(exp, root), only.split(",") if only else None)


def print_plan(exp: ExperimentConfig, root: Path, only: Sequence[str] | None) -> None:
    """The dry run: each trial and the fields it changes from the base config."""
    trials = expand(exp, only=only)
    print(f"# experiment {exp.name}: {len(trials)} trials, base {exp.base}, store {root}")
    print(f"# every trial: {short(exp.overrides)}; its seed goes into {', '.join(exp.seed_fields)}\n")
    for t in trials:
        print(f"{t.id:<24} chain={'/'.join(t.config.chain) or '(base)':<14} {short(own_overrides(exp, t))}")


def where_to_look(result: ExperimentResult, seconds: float) -> str:
    lines = [result.report.read_text(), f"Finished {len(result.trials)} trials in {seconds:.0f} s."]
    lines.append(f"- report and plots: {result.report.parent}")
    if result.mlflow_url:
        lines.append(f"- MLflow (parent run of every trial): {result.mlflow_url} (start the UI with `gft ui`)")
    if result.failed:
        lines.append(f"- FAILED trials: {', '.join(result.failed)} (rerun: finished stages are served from cache)")
    return "\n".join(lines)
