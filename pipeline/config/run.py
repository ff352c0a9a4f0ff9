"""Settings of the whole run (`RunConfig`: one table per stage, tracking, retention) and how a run config is
loaded: TOML files, path fields resolved against the file's folder, dotted overrides."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.base import S, Settings
from pipeline.config.data import DataConfig, ModelsConfig, SyntheticConfig
from pipeline.config.rollout import EngineConfig
from pipeline.config.stages import HELDOUT, EvalConfig, GFTConfig, GRPOConfig, SFTConfig, TeacherSampleConfig

__all__ = ["TrackingConfig", "RetentionConfig", "MemoryConfig", "RunConfig", "load_toml", "load_run_config",
           "resolve_paths", "apply_overrides"]


class TrackingConfig(Settings):
    """MLflow: where runs go, how the UI is reached, how the final model is registered."""

    enabled: bool = True
    """Track the run in MLflow (false: nothing is logged)."""
    uri: str | None = None
    """Tracking URI; default SQLite at `<root>/mlflow.db` (artifacts in `<root>/mlartifacts`)."""
    experiment: str | None = None
    """Experiment name; default the run's `name`."""
    ui_url: str = "http://127.0.0.1:5000"
    """Where the MLflow UI is served (`gft ui`), for links from Prefect and the summary."""
    registered_model: str | None = None
    """Registered model name of the chain's final model; default `<name>-policy`."""
    alias: str = "candidate"
    """Alias pointed at the newly registered version."""


class RetentionConfig(Settings):
    """What a finished GFT or GRPO round keeps on disk once the next round of its chain is published."""

    state: Literal["last", "all"] = "last"
    """last: only the newest round of a chain keeps `state/` (float32 weights, optimizer, RNG; about 3x the model);
    all: every round keeps it. A round whose state is gone is recomputed (same key, same bytes) if a later round
    must be recomputed from it, so a resume stays exact either way."""
    model_every: int = Field(1, ge=0)
    """Keep the `model/` of every Nth round (rounds N-1, 2N-1, ...) and always the last; 0 keeps the last only."""


class MemoryConfig(Settings):
    """Declared memory budgets per device: a run whose planned stage peak exceeds one is refused before any work."""

    cpu_gb: float | None = Field(None, gt=0)
    """The most resident memory, in GB (1e9 bytes), the run's process (with its launched training jobs' processes)
    may hold at any stage; None: no budget. `gft run --dry-run` prints each stage's planned peak."""
    gpu_gb: float | None = Field(None, gt=0)
    """The most memory, in GB, torch may reserve on one GPU at any stage; None: no budget."""


class RunConfig(Settings):
    """A whole pipeline run: where it writes, and one table per stage."""

    name: str = Field("default", pattern=r"^[^/\\\x00]+$")
    """Name of the run (the MLflow experiment and the folder under `root`); no path separators."""
    root: str = "runs"
    """Folder of the artifact store (relative paths are relative to the config file's folder)."""
    seed: int = 0
    """Seed of round prompt order and of everything not seeded by its own table."""
    threads: int = Field(1, ge=1)
    """torch threads (1 is fastest on a busy 2-core machine)."""
    chain: tuple[Literal["sft", "gft", "grpo"], ...] = ("sft", "gft")
    """Training stages in order, each starting from the previous one's checkpoint (the first from the base),
    each followed by evaluation; any subsequence of sft -> gft -> grpo."""
    data: DataConfig = DataConfig()
    """The prompt set."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """The built-in task and bootstrap models (used when data.source or models are "synthetic"/"bootstrap")."""
    models: ModelsConfig = ModelsConfig()
    """Base and teacher models."""
    engine: EngineConfig = EngineConfig()
    """The sampling engine."""
    teacher_sample: TeacherSampleConfig = TeacherSampleConfig()
    """Teacher responses."""
    sft: SFTConfig = SFTConfig()
    """The SFT stage."""
    gft: GFTConfig = GFTConfig()
    """The GFT stage."""
    grpo: GRPOConfig = GRPOConfig()
    """The GRPO stage."""
    eval: EvalConfig = EvalConfig()
    """Evaluation after each stage."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking (not part of any stage key)."""
    retention: RetentionConfig = RetentionConfig()
    """What earlier rounds keep on disk (not part of any stage key)."""
    memory: MemoryConfig = MemoryConfig()
    """Memory budgets per device, checked against the plan before any work (not part of any stage key)."""
    reward_modules: tuple[str, ...] = ()
    """Python modules (and their submodules) whose functions the config may name as rewards, `module:function`;
    a reward from any other module is refused at load. Registered verifiers (math_answer, exact_match) need none."""

    @model_validator(mode="after")
    def _rewards_allowed(self) -> RunConfig:
        specs = [("gft.reward", self.gft.reward), ("eval.reward", self.eval.reward)]
        specs += [(f"grpo.rewards[{i}]", s) for i, s in enumerate(self.grpo.rewards)]
        specs += [(f"eval.benchmarks[{i}].reward", b.reward) for i, b in enumerate(self.eval.benchmarks) if b.reward]
        for field, spec in specs:
            module = spec.partition(":")[0] if ":" in spec else None
            if module and not any(module == m or module.startswith(m + ".") for m in self.reward_modules):
                raise ValueError(f"{field} = {spec!r}: module {module!r} is not in reward_modules "
                                 f"{list(self.reward_modules)}; add it there to allow its functions as rewards")
        return self

    @model_validator(mode="after")
    def _evaluation_has_prompts(self) -> RunConfig:
        if self.data.eval_fraction == 0 and any(b.source == HELDOUT for b in self.eval.suite()):
            raise ValueError("data.eval_fraction = 0 holds out no prompts, but every checkpoint is evaluated on "
                             "held-out prompts: set it above 0 (e.g. 0.1), or list other eval.benchmarks")
        if self.data.eval_fraction + self.data.validation_fraction >= 1:
            raise ValueError(f"data.eval_fraction + data.validation_fraction = "
                             f"{self.data.eval_fraction + self.data.validation_fraction:g} leaves no training prompts")
        if self.eval.validation and self.data.validation_fraction == 0:
            raise ValueError("eval.validation = true grades checkpoints on validation prompts, but "
                             "data.validation_fraction = 0 holds none out: set it above 0 (e.g. 0.1)")
        return self

    @model_validator(mode="after")
    def _name_is_one_folder(self) -> RunConfig:
        if self.name in (".", ".."):
            raise ValueError(f"name {self.name!r}: the run's name is a folder under reports/; use a plain name")
        return self

    @model_validator(mode="after")
    def _chain_in_order(self) -> RunConfig:
        order = ("sft", "gft", "grpo")
        if list(self.chain) != sorted(set(self.chain), key=order.index):
            raise ValueError(f"chain {list(self.chain)} must be a subsequence of {list(order)} (no repeats)")
        sampled = self.models.teacher is not None and self.teacher_sample.k > 0
        if "gft" in self.chain and sampled and self.gft.teacher > self.teacher_sample.k:
            raise ValueError(f"gft.teacher = {self.gft.teacher} teacher members per group, but the teacher stage "
                             f"samples teacher_sample.k = {self.teacher_sample.k} per prompt: raise teacher_sample.k")
        return self


# ---------------------------------------------------------------------------------------------------------
# Loading: TOML files, path fields, dotted overrides
# ---------------------------------------------------------------------------------------------------------


def load_toml(model: type[S], path: str | Path, *, section: str | None = None) -> S:
    """Validate a TOML file (or one table of it) into a settings model; errors name the file."""
    path = Path(path)
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    if section is not None:
        if section not in data:
            raise KeyError(f"{path}: no [{section}] table")
        data = data[section]
    try:
        return model.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


_NOT_PATHS = {"synthetic", "bootstrap"}
_PATH_FIELDS = (("data", "source"), ("models", "base"), ("models", "teacher"))
_MODEL_FIELDS = {("models", "base"), ("models", "teacher")}
"""Path fields that name a model: a folder, or a hub id that must be loadable from here."""


def _looks_like_path(value: str) -> bool:
    """A value meant as a local path rather than a hub id ("org/name"): explicitly relative or absolute, nested
    deeper than org/name, or with a data file's suffix."""
    return (value.startswith(("./", "../", "/", "~")) or value.count("/") > 1
            or Path(value).suffix in (".jsonl", ".json", ".parquet"))


def _hub_model_unavailable(repo_id: str) -> str | None:
    """Why a model hub id cannot be loaded on this machine, or None if it can (or may: online, the hub decides
    when the model loads). With HF_HUB_OFFLINE set, only the local HF cache serves it, so its config.json must be
    there (what transformers reads first)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if not constants.is_offline_mode():
        return None
    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError as exc:
        return f"it is not valid ({exc})"
    if isinstance(cached, str):
        return None
    return (f"it is not in the local HF cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: download it "
            f"once online, or unset HF_HUB_OFFLINE")


def resolve_paths(cfg: RunConfig, folder: str | Path) -> RunConfig:
    """Every path field of a run config resolved one way: relative to the config file's `folder` (like `root`).
    A value naming an existing file or folder there becomes its absolute path; a path-like value that names
    nothing fails here, naming the field, before any stage runs; anything else is a hub id and stays as it is,
    except that a model's hub id offline (HF_HUB_OFFLINE) must be in the local HF cache, or it fails here too."""
    updates = {}
    for table, field in _PATH_FIELDS:
        value = getattr(getattr(cfg, table), field)
        if value is None or value in _NOT_PATHS:
            continue
        candidate = Path(folder) / Path(value).expanduser()
        if candidate.exists():
            updates[f"{table}.{field}"] = str(candidate.resolve())
        elif _looks_like_path(value):
            raise ValueError(f"{table}.{field} = {value!r}: no such file or folder {candidate} (relative paths are "
                             f"relative to the config file's folder; a hub id is written org/name)")
        elif (table, field) in _MODEL_FIELDS and (why := _hub_model_unavailable(value)):
            raise ValueError(f"{table}.{field} = {value!r}: no such folder {candidate}, and as a hub id {why}. A "
                             f"folder is written ./{value} (relative to the config file's folder) and must exist")
    updates.update(_benchmark_paths(cfg, Path(folder)))
    return apply_overrides(cfg, updates, where=f"paths relative to {folder}") if updates else cfg


def _benchmark_paths(cfg: RunConfig, folder: Path) -> dict[str, Any]:
    """`eval.benchmarks` with each local source resolved against `folder` (a path-like source naming nothing
    fails, naming the benchmark); the held-out split and hub ids stay as they are. {} when nothing changes."""
    benchmarks, changed = [], False
    for i, bench in enumerate(cfg.eval.benchmarks):
        data = bench.model_dump(mode="json")
        candidate = folder / Path(bench.source).expanduser()
        if bench.source != HELDOUT and candidate.exists():
            data["source"], changed = str(candidate.resolve()), True
        elif bench.source != HELDOUT and _looks_like_path(bench.source):
            raise ValueError(f"eval.benchmarks[{i}] ({bench.name}).source = {bench.source!r}: no such file or "
                             f"folder {candidate} (relative paths are relative to the config file's folder)")
        benchmarks.append(data)
    return {"eval.benchmarks": benchmarks} if changed else {}


def load_run_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A run config from its TOML file with dotted `overrides` applied (an experiment's trial, `apply_overrides`),
    then every path field resolved against the file's folder: an overridden model or data path is resolved and
    checked like one written in the file."""
    cfg = load_toml(RunConfig, path)
    if overrides:
        cfg = apply_overrides(cfg, overrides, where=f"{path} overrides")
    try:
        return resolve_paths(cfg, Path(path).resolve().parent)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def apply_overrides(cfg: S, overrides: Mapping[str, Any], *, where: str = "override") -> S:
    """A copy of `cfg` with dotted fields replaced, e.g. {"gft.tau": 0.7, "sft.train.lr": 1e-4}, validated again.
    An unknown field or a bad value raises ValueError naming `where` and the field."""
    data = cfg.model_dump(mode="json")
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = _field(node, key, path, where)
        _field(node, leaf, path, where)
        node[leaf] = value
    try:
        return type(cfg).model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _field(node: Any, key: str, path: str, where: str) -> Any:
    if not isinstance(node, dict) or key not in node:
        known = sorted(node) if isinstance(node, dict) else "none: not a table"
        raise ValueError(f"{where}: unknown field {path!r} ({key!r} is not a field there; known: {known})")
    return node[key]
