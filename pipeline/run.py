"""The pipeline's DAG and its in-process runner: data -> models -> teacher -> {SFT, GFT, GRPO} -> evaluation.

    gft run configs/default.toml                 the DAG as a Prefect flow (`flows.post_train`)
    gft run configs/default.toml --in-process    the same DAG in this process, without Prefect (`run`)

Every stage is cached in the run's artifact store, so running the same config again serves every finished
stage and computes only what is missing or changed. The run root is resolved here (`resolve_root`), for both.
The stages, the runtime and torch are imported where a run uses them: the CLI resolves the root with this module
while its Prefect API starts, and those imports take seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from pipeline import report
from pipeline.config import HELDOUT, EvalConfig, RetentionConfig, RunConfig
from pipeline.data import chat, sizes
from pipeline.memory import plan as memory_plan
from pipeline.memory.plan import StagePeak
from pipeline.store.artifacts import ArtifactRef, StageStore
from pipeline.store.outputs import read_output
from pipeline.store.retention import resumable, retain
from pipeline.tracking import MlflowTracker, NullTracker, sqlite_uri

if TYPE_CHECKING:
    from pipeline import runtime, stages

__all__ = ["RunResult", "RootError", "Ops", "local_ops", "execute", "plan", "check_memory", "run", "check_root",
           "resolve_root", "check_prompts", "chain_outputs", "stage_history", "round_metrics"]

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
    ahead: list[str] = field(default_factory=list)  # the run's stages in order, from the current one on

    def __call__(self, name: str, stage: str, *args, step: int | None = None, label: str | None = None, **kw):
        from pipeline import runtime, stages

        if name == self.refresh:
            self.res.force = True  # this stage and everything after it recompute
        self.ahead = self.ahead[self.ahead.index(stage):] if stage in self.ahead else self.ahead
        self.res.hold(runtime.STAGE_ROLES.get(stage, ()), later=runtime.roles_of(self.ahead[1:]))  # docs/memory.md
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
    call = _Walk(res, ops, refresh, cfg.retention if prune else None, stage_order(cfg))
    synth, source = stages.prepare_data_inputs(cfg.data, cfg.synthetic)
    refs = {"prompts": call("prepare_data", "prepare_data", cfg.data, synth, source)}
    refs["base"], teacher_model = resolve_models(cfg, call)
    suite = benchmarks(cfg, refs["prompts"], call)
    refs.update({f"benchmark/{b.name}": b.prompts for b in suite if b.prompts is not refs["prompts"]})
    check_prompts(cfg, refs["prompts"], refs["base"], teacher_model, suite)
    if teacher_model is not None and cfg.teacher_sample.k > 0:
        refs["teacher"] = call("teacher_sample", "teacher_sample", cfg.teacher_sample, refs["prompts"], teacher_model,
                               cfg.engine, cfg.threads)
    _evaluate(cfg, "base", refs["base"], suite, refs, call)
    init = refs["base"]
    for name in cfg.chain:
        refs[name] = init = _train(name, cfg, refs, init, call)
        _evaluate(cfg, name, init, suite, refs, call)
    return refs


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the run: the evaluation settings its stages take, and its prompts (eval.parquet)."""

    name: str
    eval: EvalConfig
    prompts: ArtifactRef


def benchmarks(cfg: RunConfig, prompts: ArtifactRef, call: Callable[..., ArtifactRef]) -> list[Benchmark]:
    """Every benchmark graded, in config order: the held-out split is `prompts` (prepare_data's output), any other
    its own `prepare_benchmark` output (validated rows of its source, cached by its content)."""
    from pipeline import stages

    suite = []
    for bench in cfg.eval.suite():
        ref = prompts if bench.source == HELDOUT else call(
            "prepare_benchmark", "prepare_benchmark", *stages.prepare_benchmark_inputs(bench, cfg.data),
            label=f"benchmark/{bench.name}")
        suite.append(Benchmark(bench.name, cfg.eval.for_benchmark(bench), ref))
    return suite


def _evaluate(cfg: RunConfig, checkpoint: str, model: ArtifactRef, suite: list[Benchmark],
              refs: dict[str, ArtifactRef], call: Callable[..., ArtifactRef]) -> None:
    """One evaluation of `model` per benchmark, each its own cached stage (keyed by model, benchmark, settings),
    under `report.eval_label`: `eval/<checkpoint>` for the primary benchmark, `eval/<checkpoint>/<benchmark>`."""
    primary = report.primary_benchmark(cfg)
    for bench in suite:
        label = report.eval_label(checkpoint, bench.name, primary)
        refs[label] = call("evaluate", "evaluate", bench.eval, bench.prompts, model, refs["base"], cfg.engine,
                           cfg.threads, label=label)


def stage_order(cfg: RunConfig) -> list[str]:
    """The stages that may use an engine, in the order the run calls them (a round stage once for its rounds)."""
    return ["teacher_sample", "evaluate"] + [s for name in cfg.chain for s in (report.chain_stage(name), "evaluate")]


REFRESHABLE = ("prepare_data", "bootstrap_models", "teacher_sample", "prepare_benchmark", "evaluate", "sft", "gft",
               "grpo")


def check_refresh(cfg: RunConfig, refresh: str | None) -> None:
    if refresh is None:
        return
    external = any(b.source != HELDOUT for b in cfg.eval.suite())
    present = [s for s in REFRESHABLE if (s not in ("sft", "gft", "grpo") or s in cfg.chain)
               and (s != "prepare_benchmark" or external)]
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
    """Prompts an engine samples: the output and file holding them, the tokenizer's model, the response budget and
    its setting, rows used (None: all)."""

    prompts: ArtifactRef
    split: str
    model: ArtifactRef
    max_new_tokens: int
    setting: str
    rows: int | None = None


def _prompt_uses(cfg: RunConfig, prompts: ArtifactRef, base: ArtifactRef, teacher: ArtifactRef | None,
                 suite: list[Benchmark]) -> list[_PromptUse]:
    uses = []
    if teacher is not None and cfg.teacher_sample.k > 0:
        uses.append(_PromptUse(prompts, "train.parquet", teacher, cfg.teacher_sample.sampling.max_new_tokens,
                               "teacher_sample.sampling.max_new_tokens"))
    for name in ("gft", "grpo"):
        if name in cfg.chain:
            uses.append(_PromptUse(prompts, "train.parquet", base, getattr(cfg, name).sampling.max_new_tokens,
                                   f"{name}.sampling.max_new_tokens"))
    for bench in suite:
        splits = ["eval.parquet"] + (["validation.parquet"] if bench.eval.validation else [])
        setting = "eval.sampling.max_new_tokens" + ("" if bench.name == HELDOUT else f" (benchmark {bench.name})")
        uses += [_PromptUse(bench.prompts, split, base, bench.eval.sampling.max_new_tokens, setting,
                            bench.eval.max_prompts) for split in splits]
    return uses


def check_prompts(cfg: RunConfig, prompts: ArtifactRef, base: ArtifactRef, teacher: ArtifactRef | None,
                  suite: list[Benchmark] = ()) -> None:
    """Refuse, before the first stage that loads a model, a prompt some engine of the run would refuse: its
    tokens plus that stage's max_new_tokens over engine.max_model_len (`chat.check_prompt_lengths`, which names the
    row, the file and the settings). A dry run's pending references are not checked."""
    uses = _prompt_uses(cfg, prompts, base, teacher, list(suite))
    if "pending" in (base.kind, teacher.kind if teacher else None, *(u.prompts.kind for u in uses)):
        return
    import pyarrow.parquet as pq

    from pipeline import runtime

    tokenizers = {}
    for use in uses:
        path = read_output(use.prompts).file(use.split)
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
    """One stage call of a dry run: its key (None while an input is still to be computed), whether it is cached,
    and its expected peak per device (`pipeline.memory.plan`; empty where the models' shapes are unknown)."""

    name: str
    stage: str
    key: str | None
    cached: bool
    memory: tuple[StagePeak, ...] = ()


def plan(cfg: RunConfig, root: Path, *, keep_engines: bool = False) -> list[PlannedCall]:
    """Every stage call of the run with its key and its memory plan, computing nothing: a call whose inputs exist
    gets its key and cache status; one downstream of a call still to run has no key yet (it depends on that
    output). `keep_engines` plans the old engine lifetime (every engine kept to the end)."""
    from pipeline import runtime

    res = runtime.Resources(StageStore(root), progress=False)
    calls: list[PlannedCall] = []
    bound: list[stages.StageCall] = []
    outputs: dict[str, ArtifactRef] = {}

    def dry(call: stages.StageCall) -> ArtifactRef:
        key = None if call.spec.pending else call.key
        ref = res.store.lookup(call.stage, key) if key else None
        calls.append(PlannedCall(call.stage.removesuffix("_round"), call.stage, key, ref is not None))
        bound.append(call)
        if ref is not None:
            outputs.setdefault(call.stage, ref)
        return ref or ArtifactRef(kind="pending", uri=f"pending:{call.stage}", sha256="0" * 64, schema_version=1)

    try:
        execute(cfg, dry, res, prune=False)
    finally:
        res.close()
    prompts = outputs.get("prepare_data")
    memory = sizes.memory_plan(cfg, bound, prompts.uri if prompts else None, keep_engines=keep_engines)
    if memory is None:
        return calls
    return [dataclasses.replace(c, memory=tuple(memory.of(i).values())) for i, c in enumerate(calls)]


def check_memory(cfg: RunConfig, root: Path) -> None:
    """Refuse, before any work, a run whose memory plan exceeds a budget of `cfg.memory` (MemoryBudgetError,
    naming the stage, the device and the largest item: `pipeline.memory.plan.check`)."""
    if cfg.memory.cpu_gb is not None or cfg.memory.gpu_gb is not None:
        memory_plan.check(cfg, [c.memory for c in plan(cfg, root)])


def run(cfg: RunConfig, *, root: Path, progress: bool = True, ops: Callable[["runtime.Resources"], Ops] = local_ops,
        context_tags: Callable[[], dict[str, str]] = dict, refresh: str | None = None,
        tags: dict[str, str] | None = None) -> RunResult:
    """Run the configured DAG with tracking; writes the summary, the plots, and registers the final model.
    `tags` go on the run's MLflow parent run (an experiment nests its runs with `mlflow.parentRunId`)."""
    import torch

    from pipeline import runtime

    check_root(root)
    check_memory(cfg, root)  # a plan over a declared budget is refused before any work
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
    metrics = {k.removeprefix("eval/"): read_output(v).eval_metrics() for k, v in refs.items()
               if k.startswith("eval/") and k.count("/") == 1}  # the primary benchmark's (`report.eval_label`)
    if cfg.eval.benchmarks:
        for metric, table in report.benchmark_tables(cfg, refs).items():  # the paper's "Avg." column, on the parent
            res.tracker.log_metrics({f"eval/{c}/average/{metric}": row["average"] for c, row in table.items() if row})
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
