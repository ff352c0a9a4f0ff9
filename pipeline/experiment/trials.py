"""Experiments: a grid of variants derived from one base run config, run as pipeline runs from the same base
model and seeds, then summarised over seeds in a table and plots, all logged to one MLflow parent run.

    gft experiment experiments/paper_table.toml [--dry-run] [--only gft,sft]   (Prefect: flows.experiment)
    python -m pipeline.experiment experiments/paper_table.toml                  (in-process, no Prefect)

An experiment TOML names the base `RunConfig` and the grid. A trial's config is the base with dotted-field
overrides applied in this order: the experiment's `overrides`, the variant's (or the sweep point's), the
variant's `chain`, then the seed, written into every field of `seed_fields`. No variant is a copied config,
and `--dry-run` prints exactly what each trial changes.

    name = "paper_table"
    base = "../configs/default.toml"      # relative to this file
    seeds = [0, 1, 2]
    [overrides]                            # every trial
    "gft.rounds" = 4
    [variants.dft]                         # one row of the table
    chain = ["sft"]
    overrides = { "sft.loss" = "dft" }
    [sweeps.tau]                           # one knob over values: variants tau-0, tau-0.5, ...
    field = "gft.tau"
    values = [0, 0.5, 1.5]
    [sweeps.composition.points]            # or named points, each a set of overrides
    "8:0" = { "gft.teacher" = 7, "gft.policy" = 0 }
    [tune]                                 # every variant with a chain runs at each value of this grid;
    values = [1e-4, 1e-3]                  # its row is the point best on the validation prompts (mean over seeds)

With `[tune]`, the trials' configs must grade validation prompts (`data.validation_fraction` > 0 and
`eval.validation = true`): a variant's reported row is its grid point with the best validation metric averaged
over seeds, so the test prompts never pick anything. Sweeps are not tuned.

`extends = "other.toml"` inherits another experiment: top-level values are replaced, `overrides` merge field by
field, and variants and sweeps merge by name.

All trials share one artifact store (by default the base config's root, so `gft run` and the experiment serve
each other's stages): what several trials have in common (the bootstrap models, teacher responses, the SFT
before GRPO, an identical sweep point) runs once, and a rerun of the experiment computes only what is missing.
A failed trial does not stop the others: it is listed in the report and the experiment ends as failed.
The report (tables, JSON, plots) is `pipeline.experiment.report`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.store.artifacts import ArtifactRef
from pipeline.config import RunConfig, Settings, apply_overrides, load_run_config
from pipeline.progress import bar
from pipeline.experiment.report import own_overrides, short, write_report

__all__ = ["VariantConfig", "SweepConfig", "ExperimentConfig", "Trial", "TrialResult", "ExperimentResult",
           "TuneConfig", "load_experiment", "expand", "tune_field", "experiment_root", "run_experiment", "local_trial", "stored_refs", "main"]

log = logging.getLogger(__name__)

Chain = tuple[Literal["sft", "gft", "grpo"], ...]
SEED_FIELDS = ("seed", "sft.train.seed", "gft.train.seed", "gft.sampling.seed", "grpo.train.seed",
               "grpo.sampling.seed")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class VariantConfig(Settings):
    """One row of the table: the chain it trains from the base model and the fields it changes."""

    chain: Chain = ()
    """Training stages from the base model, in order; () evaluates the base model only."""
    label: str | None = None
    """Row label in the report (default: the variant's name)."""
    overrides: dict[str, Any] = {}
    """Dotted RunConfig fields and their values, e.g. {"sft.loss" = "dft"}."""
    seeds: tuple[int, ...] | None = Field(None, min_length=1)
    """Seeds of this variant (default: the experiment's); e.g. [0] for a variant that no seed changes."""
    tune: bool = True
    """Run at every point of the experiment's `[tune]` grid (when it has one and the chain is not empty)."""


class TuneConfig(Settings):
    """One grid (e.g. of learning rates) every tuned variant runs at; its row is the point best on validation."""

    values: tuple[float, ...] = Field(min_length=2)
    """The grid, the same values (and so the same number of points) for every tuned variant."""
    field: str = "{stage}.train.lr"
    """The dotted field a point sets; {stage} is the variant's last training stage (sft, gft or grpo)."""
    metric: str = "val/mean@{k}"
    """The validation metric that picks a variant's point, higher is better ({k}: eval.k), mean over seeds."""


class SweepConfig(Settings):
    """One knob over several values (`field` + `values`) or several named `points`: one variant per value."""

    chain: Chain = ("gft",)
    """Training stages of every point."""
    label: str | None = None
    """Axis label in the report and plots (default: `field`, or the sweep's name)."""
    field: str | None = None
    """The dotted field the sweep sets, e.g. "gft.tau"."""
    values: tuple[Any, ...] = ()
    """The values of `field`, one variant each (named "<sweep>-<value>")."""
    points: dict[str, dict[str, Any]] = {}
    """Named points, each a set of dotted-field overrides (instead of `field` + `values`)."""
    overrides: dict[str, Any] = {}
    """Fields every point of the sweep changes (applied before the point's own)."""
    seeds: tuple[int, ...] | None = Field(None, min_length=1)
    """Seeds of the sweep (default: the experiment's)."""

    @model_validator(mode="after")
    def _one_axis(self) -> SweepConfig:
        if (self.field is not None) == bool(self.points) or (self.field is not None) != bool(self.values):
            raise ValueError("a sweep needs either `field` with `values`, or `points` (not both)")
        return self


class ExperimentConfig(Settings):
    """A base run config, the variants and sweeps derived from it, and the seeds every variant runs with."""

    name: str = Field(pattern=_NAME.pattern)
    """Name of the experiment: its MLflow experiment and its report folder `<root>/reports/<name>`."""
    base: str
    """The base RunConfig TOML (relative to the experiment file that names it)."""
    root: str | None = None
    """Artifact store (relative to the experiment file); default: the base config's root."""
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    """Seeds every variant runs with (unless it names its own)."""
    seed_fields: tuple[str, ...] = SEED_FIELDS
    """RunConfig fields a trial's seed is written into (the base model and data do not change with it)."""
    overrides: dict[str, Any] = {}
    """Dotted fields every trial changes from the base config."""
    variants: dict[str, VariantConfig] = {}
    """The table's rows by name."""
    sweeps: dict[str, SweepConfig] = {}
    """One-knob sweeps by name, each reported as its own table and plot."""
    tune: TuneConfig | None = None
    """A grid every variant with a chain runs at, reported at its best point on validation (None: no tuning)."""

    @model_validator(mode="after")
    def _names(self) -> ExperimentConfig:
        if not self.variants and not self.sweeps:
            raise ValueError("an experiment needs at least one variant or sweep")
        bad = [n for n in [*self.variants, *self.sweeps] if not _NAME.match(n)]
        if bad:
            raise ValueError(f"variant/sweep names may hold letters, digits, '_' and '-' only: {bad}")
        return self


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read an experiment TOML (following `extends`), paths resolved against the file that names them."""
    path = Path(path).resolve()
    data = _layer(path, ())
    try:
        return ExperimentConfig.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _layer(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path in seen:
        raise ValueError(f"{path}: `extends` loops back to itself ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} not found" + (f" (extended by {seen[-1]})" if seen else ""))
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    for key in ("base", "root"):
        if isinstance(data.get(key), str):
            data[key] = str((path.parent / data[key]).resolve())
    parent = data.pop("extends", None)
    if parent is None:
        return data
    merged = _layer((path.parent / parent).resolve(), (*seen, path))
    for key, value in data.items():
        merge = key in ("overrides", "variants", "sweeps") and isinstance(value, dict)
        merged[key] = {**merged.get(key, {}), **value} if merge else value
    return merged


@dataclass(frozen=True)
class Trial:
    """One pipeline run of the experiment: a variant at one seed, with every field it changes from the base."""

    variant: str
    group: str  # "variants" or the sweep's name
    label: str
    seed: int
    overrides: dict[str, Any]
    config: RunConfig
    x: Any = None  # the sweep's value or point name
    point: float | None = None  # the `[tune]` grid value this trial runs at (None: not tuned)
    tag: str = ""  # the grid point in names, e.g. "lr0.001"

    @property
    def id(self) -> str:
        return ".".join(p for p in (self.variant, self.tag, f"s{self.seed}") if p)


@dataclass(frozen=True)
class _Variant:
    name: str
    group: str
    label: str
    chain: Chain
    overrides: dict[str, Any]
    seeds: tuple[int, ...]
    x: Any = None
    tuned: bool = False


def _variants(exp: ExperimentConfig) -> list[_Variant]:
    out = [_Variant(n, "variants", v.label or n, v.chain, dict(v.overrides), v.seeds or exp.seeds,
                    tuned=exp.tune is not None and v.tune and bool(v.chain))
           for n, v in exp.variants.items()]
    for name, s in exp.sweeps.items():
        points = [(_fmt(v), {s.field: v}, v) for v in s.values] if s.field else [
            (p, sets, p) for p, sets in s.points.items()]
        for point, sets, x in points:
            label = f"{s.label or s.field or name} = {point}"
            out.append(_Variant(f"{name}-{_slug(point)}", name, label, s.chain, {**s.overrides, **sets},
                                s.seeds or exp.seeds, x))
    return out


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")


def expand(exp: ExperimentConfig, *, only: Iterable[str] | None = None) -> list[Trial]:
    """Every trial of the experiment, seed by seed (a whole table per seed), each config derived from the base.
    `only` keeps the named variants (or sweeps); an unknown name raises ValueError listing the known ones."""
    base = load_run_config(exp.base)
    variants = _variants(exp)
    if only is not None:
        wanted = set(only)
        known = {v.name for v in variants} | {v.group for v in variants}
        if wanted - known:
            raise ValueError(f"--only {sorted(wanted - known)}: not in the experiment; known: {sorted(known)}")
        variants = [v for v in variants if v.name in wanted or v.group in wanted]
    seeds = list(dict.fromkeys(s for v in variants for s in v.seeds))
    return [_trial(exp, base, v, seed, point) for seed in seeds for v in variants if seed in v.seeds
            for point in (exp.tune.values if v.tuned else (None,))]


def tune_field(exp: ExperimentConfig, chain: Chain) -> str:
    """The field the `[tune]` grid sets for a variant with this chain, e.g. "gft.train.lr"."""
    return exp.tune.field.format(stage=chain[-1])


def _trial(exp: ExperimentConfig, base: RunConfig, v: _Variant, seed: int, point: float | None) -> Trial:
    tuned = {} if point is None else {tune_field(exp, v.chain): point}
    tag = "" if point is None else f"{tune_field(exp, v.chain).rsplit('.', 1)[-1]}{_fmt(float(point))}"
    name = ".".join(p for p in (exp.name, v.name, tag, f"s{seed}") if p)
    sets = {**exp.overrides, **v.overrides, **tuned, "chain": list(v.chain), **{f: seed for f in exp.seed_fields},
            "name": name, "tracking.experiment": exp.name, "tracking.registered_model": f"{exp.name}.{v.name}"}
    where = f"experiment {exp.name!r}, variant {v.name!r}, seed {seed}" + (f", {tag}" if tag else "")
    cfg = apply_overrides(base, sets, where=where)
    if point is not None and not cfg.eval.validation:
        raise ValueError(f"{where}: [tune] picks each variant's point on validation prompts, but the trial's "
                         "eval.validation is false: set data.validation_fraction > 0 and eval.validation = true "
                         "in the experiment's [overrides]")
    return Trial(v.name, v.group, v.label, seed, sets, cfg, v.x, point, tag)


def experiment_root(exp: ExperimentConfig) -> Path:
    """The artifact store: the experiment's `root`, else the base config's root (beside the base config)."""
    if exp.root:
        return Path(exp.root)
    return (Path(exp.base).parent / load_run_config(exp.base).root).resolve()


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialResult:
    """A finished trial's stage references (None when it failed, with the error)."""

    trial: Trial
    refs: dict[str, ArtifactRef] | None
    error: str | None = None
    wall_s: float = 0.0


@dataclass(frozen=True)
class ExperimentResult:
    """Every trial's result, the report and plots, and the experiment's MLflow run."""

    trials: list[TrialResult]
    report: Path
    plots: list[Path]
    mlflow_url: str | None
    failed: list[str] = field(default_factory=list)


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


# ---------------------------------------------------------------------------------------------------------
# Command line (in-process; `gft experiment` runs the same through Prefect)
# ---------------------------------------------------------------------------------------------------------


def open_experiment(config: Path, root: Path | None, only: str | None,
                    ) -> tuple[ExperimentConfig, Path, list[str] | None]:
    """What the command lines take: the experiment file, its store (`root`, else the experiment's own), and the
    comma-separated `only` as a list."""
    exp = load_experiment(config)
    return exp, (root or experiment_root(exp)).resolve(), only.split(",") if only else None


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.experiment", description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path, help="an experiment TOML, e.g. experiments/paper_table.toml")
    p.add_argument("--root", type=Path, help="artifact store (default: the experiment's or base config's root)")
    p.add_argument("--only", help="comma-separated variants or sweeps to run")
    p.add_argument("--dry-run", action="store_true", help="list the trials and what each changes; run nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    exp, root, only = open_experiment(args.config, args.root, args.only)
    if args.dry_run:
        print_plan(exp, root, only)
        return 0
    start = time.perf_counter()
    result = run_experiment(exp, root, local_trial(root), only=only)
    print(where_to_look(result, time.perf_counter() - start))
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
