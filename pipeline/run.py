"""The pipeline's DAG and its in-process runner: data -> models -> teacher -> {SFT, GFT, GRPO} -> evaluation.

    gft run configs/default.toml                 the DAG as a Prefect flow (`flows.post_train`)
    gft run configs/default.toml --in-process    the same DAG in this process, without Prefect (`run`)

Every stage is cached in the run's artifact store, so running the same config again serves every finished
stage and computes only what is missing or changed. The run root is resolved here (`resolve_root`), for both.
The stages, the runtime and torch are imported where a run uses them: the CLI resolves the root with this module
while its Prefect API starts, and those imports take seconds.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from pipeline import report
from pipeline.config import RetentionConfig, RunConfig
from pipeline.data import chat
from pipeline.store.artifacts import ArtifactRef, StageStore
from pipeline.store.outputs import read_output
from pipeline.store.retention import resumable, retain
from pipeline.tracking import MlflowTracker, NullTracker, sqlite_uri

if TYPE_CHECKING:
    from pipeline import runtime, stages

__all__ = ["RunResult", "RootError", "Ops", "local_ops", "execute", "plan", "run", "check_root", "resolve_root",
           "check_prompts", "chain_outputs", "stage_history", "round_metrics"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RunResult:
    """References of every stage output, the evaluation metrics by checkpoint, and the summary file."""

    refs: dict[str, ArtifactRef]
    metrics: dict[str, dict[str, float]]
    summary_path: Path
    calls: dict[str, int]
    mlflow_url: str | None = None


class RootError(RuntimeError):
    """The run root cannot hold a run: it is read-only or not a folder."""


Ops = Callable[["stages.StageCall"], ArtifactRef]
"""How a run executes a bound stage call: `stages.execute` in this process (`local_ops`), a Prefect task wrapping
the same function (`flows.post_train`), or a dry run that only reads the key (`plan`)."""


def local_ops(res: runtime.Resources) -> Ops:
    """The stage functions themselves, in this process."""
    from pipeline import stages

    return functools.partial(stages.execute, res=res)


@dataclass
class _Walk:
    """Binds and calls stages in run order: switches `res.force` on at the refreshed stage, reports each result."""

    res: runtime.Resources
    ops: Ops
    refresh: str | None
    retention: RetentionConfig | None  # None: prune nothing (a dry run)

    def __call__(self, name: str, stage: str, *args, step: int | None = None, label: str | None = None, **kw):
        from pipeline import stages

        if name == self.refresh:
            self.res.force = True  # this stage and everything after it recompute
        ref = self.ops(stages.bind(stage, *args, **kw))
        self.res.tracker.observe(label or name, ref, step=step)  # label: which call of a repeated stage
        return ref

    def cached(self, stage: str, *args) -> bool:
        """Whether the call would be served from the store (no refresh in force, a verified output there)."""
        from pipeline import stages

        call = stages.bind(stage, *args)
        return not self.res.force and not call.spec.pending and self.res.store.lookup(stage, call.key) is not None

    def retain(self, ref: ArtifactRef, round_idx: int) -> None:
        """Prune a round whose successor is published, per the run's retention (a pending reference: nothing yet)."""
        if self.retention is not None and ref.kind != "pending" and retain(self.res.store, ref, round_idx,
                                                                           self.retention):
            self.res.tracker.mark_pruned(ref, self.res.store.pruned(ref))  # its MLflow model says its weights went

    def recompute(self, name: str, stage: str, *args, step: int | None = None) -> ArtifactRef:
        """The call computed even though its (pruned) output is in the store; it republishes the complete output."""
        force, self.res.force = self.res.force, True
        try:
            return self(name, stage, *args, step=step)
        finally:
            self.res.force = force


def execute(cfg: RunConfig, ops: Ops, res: runtime.Resources, *, refresh: str | None = None,
            prune: bool = True) -> dict[str, ArtifactRef]:
    """The run's DAG: prompts -> models -> teacher responses -> eval(base) -> chain stages, each from the previous
    checkpoint and each evaluated. `refresh` names the first stage to recompute even if cached; `prune` applies the
    retention policy to finished rounds (off for a dry run)."""
    from pipeline import stages

    check_refresh(cfg, refresh)
    call = _Walk(res, ops, refresh, cfg.retention if prune else None)
    synth, source = stages.prepare_data_inputs(cfg.data, cfg.synthetic)
    refs = {"prompts": call("prepare_data", "prepare_data", cfg.data, synth, source)}
    refs["base"], teacher_model = resolve_models(cfg, call)
    check_prompts(cfg, refs["prompts"], refs["base"], teacher_model)
    if teacher_model is not None and cfg.teacher_sample.k > 0:
        refs["teacher"] = call("teacher_sample", "teacher_sample", cfg.teacher_sample, refs["prompts"], teacher_model,
                               cfg.engine, cfg.threads)
    refs["eval/base"] = call("evaluate", "evaluate", cfg.eval, refs["prompts"], refs["base"], refs["base"],
                             cfg.engine, cfg.threads, label="eval/base")
    init = refs["base"]
    for name in cfg.chain:
        refs[name] = init = _train(name, cfg, refs, init, call)
        refs[f"eval/{name}"] = call("evaluate", "evaluate", cfg.eval, refs["prompts"], init, refs["base"], cfg.engine,
                                    cfg.threads, label=f"eval/{name}")
    return refs


REFRESHABLE = ("prepare_data", "bootstrap_models", "teacher_sample", "evaluate", "sft", "gft", "grpo")


def check_refresh(cfg: RunConfig, refresh: str | None) -> None:
    if refresh is None:
        return
    present = [s for s in REFRESHABLE if s not in ("sft", "gft", "grpo") or s in cfg.chain]
    if refresh not in present:
        raise ValueError(f"--refresh {refresh!r}: not a stage of this run; choose one of {present}")


def resolve_models(cfg: RunConfig, call: Callable[..., ArtifactRef]) -> tuple[ArtifactRef, ArtifactRef | None]:
    """Base and teacher references: the bootstrap pair for "bootstrap", else external models."""
    from pipeline import runtime, stages

    needs_bootstrap = "bootstrap" in (cfg.models.base, cfg.models.teacher)
    pair = call("bootstrap_models", "bootstrap_models", cfg.synthetic, cfg.threads) if needs_bootstrap else None

    def model(spec: str, role: str) -> ArtifactRef:
        return stages.bootstrap_member(pair, role) if spec == "bootstrap" else runtime.external_model(spec)

    return model(cfg.models.base, "base"), None if cfg.models.teacher is None else model(cfg.models.teacher, "teacher")


@dataclass(frozen=True)
class _PromptUse:
    """Prompts an engine samples: file, tokenizer's model, response budget and its setting, rows used (None: all)."""

    split: str
    model: ArtifactRef
    max_new_tokens: int
    setting: str
    rows: int | None = None


def _prompt_uses(cfg: RunConfig, base: ArtifactRef, teacher: ArtifactRef | None) -> list[_PromptUse]:
    uses = []
    if teacher is not None and cfg.teacher_sample.k > 0:
        uses.append(_PromptUse("train.parquet", teacher, cfg.teacher_sample.sampling.max_new_tokens,
                               "teacher_sample.sampling.max_new_tokens"))
    for name in ("gft", "grpo"):
        if name in cfg.chain:
            uses.append(_PromptUse("train.parquet", base, getattr(cfg, name).sampling.max_new_tokens,
                                   f"{name}.sampling.max_new_tokens"))
    splits = ["eval.parquet"] + (["validation.parquet"] if cfg.eval.validation else [])
    uses += [_PromptUse(split, base, cfg.eval.sampling.max_new_tokens, "eval.sampling.max_new_tokens",
                        cfg.eval.max_prompts) for split in splits]
    return uses


def check_prompts(cfg: RunConfig, prompts: ArtifactRef, base: ArtifactRef, teacher: ArtifactRef | None) -> None:
    """Refuse, before the first stage that loads a model, a prompt some engine of the run would refuse: its
    tokens plus that stage's max_new_tokens over engine.max_model_len (`chat.check_prompt_lengths`, which names the
    row, the file and the settings). A dry run's pending references are not checked."""
    if "pending" in (prompts.kind, base.kind, teacher.kind if teacher else None):
        return
    import pyarrow.parquet as pq

    from pipeline import runtime

    folder, tokenizers = read_output(prompts), {}
    for use in _prompt_uses(cfg, base, teacher):
        path = folder.file(use.split)
        table = pq.read_table(path, columns=["id", "prompt"]).to_pydict()
        rows = list(zip(map(str, table["id"]), table["prompt"]))[: use.rows]
        if use.model.sha256 not in tokenizers:
            tokenizers[use.model.sha256] = chat.load_tokenizer(
                runtime.model_dir(use.model), trust_remote_code=cfg.engine.trust_remote_code)
        chat.check_prompt_lengths(tokenizers[use.model.sha256], rows, max_new_tokens=use.max_new_tokens,
                                  max_model_len=cfg.engine.max_model_len, where=str(path),
                                  budget_setting=use.setting)


def _train(name: str, cfg: RunConfig, refs: dict[str, ArtifactRef], init: ArtifactRef, call: _Walk) -> ArtifactRef:
    """One chain stage from `init`; GFT and GRPO as one call per round (each round its own cached task)."""
    teacher, prompts = refs.get("teacher"), refs["prompts"]
    if name == "sft":
        return call("sft", "sft", cfg.sft, prompts, teacher if cfg.sft.source == "mix" else None, init,
                    cfg.engine.trust_remote_code, cfg.threads)
    return _rounds(name, cfg, prompts, teacher, init, call)


def _rounds(name: str, cfg: RunConfig, prompts: ArtifactRef, teacher: ArtifactRef | None, init: ArtifactRef,
            call: _Walk) -> ArtifactRef:
    """GFT or GRPO as one call per round (each round its own cached task). Once a round is published, the one
    before it is pruned per `cfg.retention`; a round that must compute from a pruned one first recomputes that
    one (recursively, from the newest complete round: same keys, same bytes)."""

    stage = report.chain_stage(name)

    def args(r: int, prev: ArtifactRef) -> tuple:
        if name == "gft":
            return cfg.gft, r, prompts, teacher, prev, cfg.engine, cfg.seed, cfg.threads
        return cfg.grpo, r, prompts, init if cfg.grpo.beta > 0 else None, prev, cfg.engine, cfg.seed, cfg.threads

    chain = [init]  # chain[r + 1] is round r's output
    for r in range(cfg.gft.rounds if name == "gft" else cfg.grpo.rounds):
        if not resumable(call.res.store, chain[r]) and not call.cached(stage, *args(r, chain[r])):
            _restore(name, stage, chain, r - 1, args, call)
        chain.append(call(name, stage, *args(r, chain[r]), step=r))
        if r > 0:
            call.retain(chain[r], r - 1)
    if not resumable(call.res.store, chain[-1]):  # the last round, pruned by an earlier, longer run: rebuild it
        _restore(name, stage, chain, len(chain) - 2, args, call)
    return chain[-1]


def _restore(name: str, stage: str, chain: list[ArtifactRef], r: int, args: Callable[..., tuple],
             call: _Walk) -> None:
    """Recompute pruned round `r` into `chain[r + 1]` (same key, so the same reference), its own input first; the
    round before it is pruned again once it is no longer needed."""
    if r < 0:
        raise RuntimeError(f"{name}: the chain's initial checkpoint {chain[0].uri} is pruned; it cannot be rebuilt")
    if not resumable(call.res.store, chain[r]):
        _restore(name, stage, chain, r - 1, args, call)
    log.info("%s round %d was pruned; recomputing it to continue the chain", name, r)
    chain[r + 1] = call.recompute(name, stage, *args(r, chain[r]), step=r)
    if r > 0:
        call.retain(chain[r], r - 1)


@dataclass(frozen=True)
class PlannedCall:
    """One stage call of a dry run: its key (None while an input is still to be computed) and whether it is cached."""

    name: str
    stage: str
    key: str | None
    cached: bool


def plan(cfg: RunConfig, root: Path) -> list[PlannedCall]:
    """Every stage call of the run with its key, computing nothing: a call whose inputs exist gets its key and
    cache status; one downstream of a call still to run has no key yet (it depends on that output)."""
    from pipeline import runtime

    res = runtime.Resources(StageStore(root), progress=False)
    calls: list[PlannedCall] = []

    def dry(call: stages.StageCall) -> ArtifactRef:
        key = None if call.spec.pending else call.key
        ref = res.store.lookup(call.stage, key) if key else None
        calls.append(PlannedCall(call.stage.removesuffix("_round"), call.stage, key, ref is not None))
        return ref or ArtifactRef(kind="pending", uri=f"pending:{call.stage}", sha256="0" * 64, schema_version=1)

    try:
        execute(cfg, dry, res, prune=False)
    finally:
        res.close()
    return calls


def run(cfg: RunConfig, *, root: Path, progress: bool = True, ops: Callable[["runtime.Resources"], Ops] = local_ops,
        context_tags: Callable[[], dict[str, str]] = dict, refresh: str | None = None,
        tags: dict[str, str] | None = None) -> RunResult:
    """Run the configured DAG with tracking; writes the summary, the plots, and registers the final model.
    `tags` go on the run's MLflow parent run (an experiment nests its runs with `mlflow.parentRunId`)."""
    import torch

    from pipeline import runtime

    check_root(root)
    torch.set_num_threads(cfg.threads)
    tracker = make_tracker(cfg, root, context_tags)
    res = runtime.Resources(StageStore(root), progress=progress, tracker=tracker)
    tracker.start_pipeline(f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", cfg.model_dump(mode="json"),
                           {"pipeline.config_digest": cfg.digest(), "pipeline.root": str(root), **(tags or {})})
    try:
        refs = execute(cfg, ops(res), res, refresh=refresh)
        result = finish(cfg, refs, res, root)
    except BaseException:
        tracker.end_pipeline("FAILED")
        raise
    finally:
        res.close()
    tracker.end_pipeline("FINISHED")
    return result


def resolve_root(config: str | Path, cfg: RunConfig, root: str | Path | None = None) -> Path:
    """The run root, the one place it is resolved: `root` if given (relative to the working folder), else the
    config's `root` relative to the config file's folder. An experiment's store is its base config's root."""
    return Path(root).resolve() if root else (Path(config).resolve().parent / cfg.root).resolve()


def check_root(root: Path) -> None:
    """Refuse, before any server or stage starts, a run root the run cannot write: it writes stage outputs, its
    MLflow database (`mlflow.db`, opened for writing even when every stage is cached), logs and the summary there.
    Creates the root when it is missing."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
        if (root / "mlflow.db").is_file():
            open(root / "mlflow.db", "r+b").close()  # a probe: opened for writing, closed at once
    except OSError as exc:
        what = "read-only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "not writable"
        raise RootError(
            f"run root {root} is {what} ({exc.strerror}: {exc.filename or root}). A run writes its stage outputs, "
            "its MLflow database and its summary there, even when every stage is cached. Copy the root to a "
            "writable place (roots are relocatable) and pass --root, or look at it without running: "
            f"gft ui --root {root}") from exc


def make_tracker(cfg: RunConfig, root: Path, context_tags: Callable[[], dict[str, str]] = dict):
    """MLflow per `cfg.tracking` (default SQLite in the run root), or the null tracker when disabled."""
    t = cfg.tracking
    if not t.enabled:
        return NullTracker()
    uri = t.uri or sqlite_uri(root / "mlflow.db")
    location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    return MlflowTracker(uri, t.experiment or cfg.name, artifact_location=location, ui_url=t.ui_url,
                         context_tags=context_tags)


def finish(cfg: RunConfig, refs: dict[str, ArtifactRef], res: runtime.Resources, root: Path) -> RunResult:
    """Metrics by checkpoint, the summary and plots (logged to the parent run), the final model registered."""
    metrics = {k.removeprefix("eval/"): read_output(v).eval_metrics() for k, v in refs.items() if k.startswith("eval/")}
    out = root / "reports" / cfg.name
    plot_paths = report.write_plots(cfg, refs, metrics, out)
    registered = None
    if cfg.chain:
        name = cfg.tracking.registered_model or f"{cfg.name}-policy"
        version = res.tracker.register(refs[cfg.chain[-1]], name, cfg.tracking.alias)
        registered = f"models:/{name}@{cfg.tracking.alias}" + (f" (version {version})" if version else "")
    summary = report.write_summary(out / "summary.md", cfg, refs, metrics, plot_paths, res.tracker, registered)
    for path in [summary, *plot_paths]:
        res.tracker.log_artifact(path, "report")
    url = res.tracker.parent_url()
    return RunResult(refs=refs, metrics=metrics, summary_path=summary, calls=dict(res.calls), mlflow_url=url)
