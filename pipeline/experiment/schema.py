"""Experiments, the schema: a grid of variants derived from one base run config, and its trials.

An experiment TOML names the base `RunConfig` and the grid. A trial's config is the base with dotted-field
overrides applied in this order: the experiment's `overrides`, the variant's (or the sweep point's), the
variant's `chain`, then the seed, written into every field of `seed_fields`. No variant is a copied config,
and `gft experiment --dry-run` prints exactly what each trial changes.

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

The package imports one way: `schema` (this module) <- `report` (tables, JSON, plots) <- `trials` (the runner).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import RunConfig, Settings, apply_overrides, load_run_config, resolve_paths
from pipeline.store.artifacts import ArtifactRef

__all__ = ["VariantConfig", "SweepConfig", "ExperimentConfig", "TuneConfig", "Trial", "TrialResult",
           "ExperimentResult", "load_experiment", "expand", "tune_field", "experiment_root"]

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
    cfg = resolve_paths(apply_overrides(base, sets, where=where), Path(exp.base).parent)  # overridden paths too
    if point is not None and not cfg.eval.validation:
        raise ValueError(f"{where}: [tune] picks each variant's point on validation prompts, but the trial's "
                         "eval.validation is false: set data.validation_fraction > 0 and eval.validation = true "
                         "in the experiment's [overrides]")
    return Trial(v.name, v.group, v.label, seed, sets, cfg, v.x, point, tag)


def experiment_root(exp: ExperimentConfig, root: str | Path | None = None) -> Path:
    """The artifact store: `root` if given, else the experiment's `root`, else the base config's root (beside
    the base config), resolved by `pipeline.run.resolve_root` like a run's."""
    from pipeline.run import resolve_root

    return resolve_root(exp.base, load_run_config(exp.base), root or exp.root)


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
