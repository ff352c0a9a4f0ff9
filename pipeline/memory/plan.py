"""The run's memory, planned before it runs: each stage call's expected peak per device, itemized, from the
models' shapes (`pipeline.memory.shapes`), the stage's settings (batch, engine, where each part lives) and what
the process holds when the call runs; and the refusal of a plan that does not fit a declared budget
(`check_budget`), naming the stage, the device and the largest item.

The plan is fed the run's stage calls in order (`PlanCall`: the stage and its bound arguments, as the run binds
them), so it follows the run's own DAG. What a call holds follows the runtime (`pipeline.runtime.Resources`,
docs/memory.md): a stage holds the engines of its own roles (teacher_sample: the teacher's; evaluate: the
evaluated checkpoint's and, for KL(base || policy), the base's; a round: the policy's while it samples); an HF engine
is released before a stage that does not use its role and around training in the stage's process (the trainer
holds its own copy of the weights); a vLLM engine is kept while a later stage uses its role. `keep_engines` plans
the old lifetime (every engine kept to the end of the process).

A call's peak is its largest phase (sampling, scoring, training), each the sum of its items, in GB (1e9 bytes) as
`pipeline.memory.measure` reports them: "cpu" is the process's resident memory (with a launched job's processes),
"cuda" torch's memory on one GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import EngineConfig, RunConfig, SyntheticConfig, TrainConfig
from pipeline.memory.items import (
    BASELINE_CPU_GB, CUDA_CONTEXT_CPU_GB, TRACKING_CPU_GB, Item, Phase, Where, engine_items, prompt_len,
    scoring_items, trainer_items,
)
from pipeline.memory.shapes import GB, ModelShape

__all__ = ["PlanCall", "Shapes", "StagePeak", "MemoryPlan", "MemoryBudgetError", "ROLES", "plan_memory",
           "plan_run", "check_budget", "check"]

ROLES: dict[str, frozenset[str]] = {"teacher_sample": frozenset({"teacher"}), "evaluate": frozenset({"eval", "base"}),
                                    "gft_round": frozenset({"policy"}), "grpo_round": frozenset({"policy"})}
"""The engine roles each stage uses (as `pipeline.runtime.STAGE_ROLES`); a stage not named uses none."""


@dataclass(frozen=True)
class PlanCall:
    """One stage call of the run: its label (e.g. "eval/sft", "gft/0"), the stage and its bound arguments."""

    label: str
    stage: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class Shapes:
    """The shapes of the run's models: the base (every chain checkpoint has its shape), the teacher, and the
    bootstrap models' when a stage builds them."""

    base: ModelShape
    teacher: ModelShape | None = None
    bootstrap: ModelShape | None = None


@dataclass(frozen=True)
class StagePeak:
    """One stage call's expected peak on one device at its largest phase, itemized."""

    index: int  # the call's position in run order
    label: str
    stage: str
    device: str
    phase: str
    items: tuple[Item, ...]

    @property
    def total(self) -> float:
        return sum(i.gb for i in self.items)

    @property
    def largest(self) -> Item:
        return max(self.items, key=lambda i: i.gb)


@dataclass(frozen=True)
class MemoryPlan:
    """Every stage call's expected peak per device, in run order."""

    stages: tuple[StagePeak, ...]

    def peak(self, device: str) -> float:
        return max((s.total for s in self.stages if s.device == device), default=0.0)

    def of(self, index: int) -> dict[str, StagePeak]:
        """The peaks of the call at `index`, by device."""
        return {s.device: s for s in self.stages if s.index == index}


class MemoryBudgetError(ValueError):
    """A planned stage exceeds the declared memory budget of a device."""


@dataclass
class _Walk:
    """The process's engines while the calls run in order."""

    shapes: Shapes
    where: Where
    keep_engines: bool
    held: dict[str, tuple[ModelShape, EngineConfig]] = field(default_factory=dict)  # role -> its engine

    def enter(self, roles: frozenset[str], later: set[str]) -> None:
        """Before a call: release what `Resources.hold` releases (HF engines of other roles, vLLM engines no
        later call uses); nothing with `keep_engines`."""
        if not self.keep_engines:
            self.held = {r: h for r, h in self.held.items()
                         if r in roles or (r in later and h[1].backend == "vllm")}

    def phase(self, name: str, *, training: bool = False, without: str | None = None) -> Phase:
        """A phase's fixed part: the baseline and the engines held (but `without`'s; HF ones released around
        in-process training)."""
        phase = Phase(name).add("cpu", "process baseline", self.where.baseline_gb * GB)
        if self.where.cuda:
            phase.add("cpu", "CUDA context", CUDA_CONTEXT_CPU_GB * GB)
        for role, (shape, engine) in self.held.items():
            released = training and engine.backend == "hf" and not self.keep_engines
            if role != without and not released:
                engine_items(phase, role, shape, engine, self.where)
        return phase

    def sample(self, name: str, role: str, shape: ModelShape, engine: EngineConfig, *, n: int, max_new_tokens: int,
               prompts: int | None = None) -> Phase:
        """The engine of `role` built (or kept) and sampling n completions per prompt."""
        phase = self.phase(name, without=role)
        self.held[role] = (shape, engine)
        return engine_items(phase, role, shape, engine, self.where, n=n, max_new_tokens=max_new_tokens,
                            prompts=prompts)

    def train(self, name: str, train: TrainConfig, shape: ModelShape, *, rows: int, tokens: int, scored: int,
              reference: ModelShape | None = None) -> Phase:
        """A training phase: in this process (HF engines released around it), or a launched job whose processes
        each hold the trainer (DDP) or its 1/N shard (FSDP) beside the stage's process (HF engines released
        around either; vLLM ones kept, asleep with sleep mode)."""
        launch = train.launch
        if not launch.launched:
            phase = trainer_items(self.phase(name, training=True), shape, train, self.where, rows=rows,
                                  tokens=tokens, scored=scored)
            return phase if reference is None else scoring_items(phase, "reference", reference, self.where,
                                                                 rows=min(rows, 16), tokens=tokens)
        job = trainer_items(Phase("job"), shape, train, self.where, rows=rows, tokens=tokens, scored=scored)
        if reference is not None:
            scoring_items(job, "reference", reference, self.where, rows=min(rows, 16), tokens=tokens)
        phase, n = self.phase(name, training=True), launch.processes
        state = ("trainer weights", "gradients", "AdamW moments")
        phase.add("cpu", f"job: {n} process baselines", n * BASELINE_CPU_GB * GB)  # no tracking there
        for device, items in job.items.items():
            for item in items:
                each = item.gb / launch.world_size if launch.strategy == "fsdp" and item.name in state else item.gb
                phase.add(device, f"job: {item.name} x {n} processes", each * n * GB)
        return phase


def _bootstrap(walk: _Walk, synth: SyntheticConfig) -> list[Phase]:
    """The embedded default's two tiny models, trained one after the other (`rounds.bootstrap`)."""
    if walk.shapes.bootstrap is None:
        return [walk.phase("training")]
    train = TrainConfig(sequences_per_step=synth.batch_size, micro_batch_size=synth.batch_size, precision="fp32")
    tokens = 256  # the tiny models' max_position_embeddings
    return [walk.train("training", train, walk.shapes.bootstrap, rows=synth.batch_size, tokens=tokens,
                       scored=synth.batch_size * tokens // 2)]


def _teacher(walk: _Walk, a: Mapping[str, Any]) -> list[Phase]:
    cfg, shape = a["cfg"], walk.shapes.teacher or walk.shapes.base
    return [walk.sample("sampling", "teacher", shape, a["engine"], n=cfg.k,
                        max_new_tokens=cfg.sampling.max_new_tokens)]


def _same(a, b) -> bool:
    return a.uri == b.uri and a.sha256 == b.sha256


def _evaluate(walk: _Walk, a: Mapping[str, Any]) -> list[Phase]:
    """Sampling (k and greedy), then, unless the checkpoint is the base, the base's KL samples (both engines
    held), then one scoring model at a time: the policy's on its own (and the base's) samples, then the base's
    (`rounds.evaluate._entropy_and_kl`)."""
    ev, engine, shape, where = a["cfg"], a["engine"], walk.shapes.base, walk.where
    new = ev.sampling.max_new_tokens
    tokens = prompt_len(where, engine, new) + new
    rows = min(16, (ev.max_prompts or 16) * ev.k)
    phases = [walk.sample("sampling", "eval", shape, engine, n=ev.k, max_new_tokens=new, prompts=ev.max_prompts)]
    kl = ev.kl_samples > 0 and not _same(a["model"], a["base"])
    if kl:
        phases.append(walk.sample("KL sampling", "base", shape, engine, n=ev.kl_samples, max_new_tokens=new,
                                  prompts=ev.max_prompts))
    phases.append(scoring_items(walk.phase("scoring"), "policy", shape, where, rows=rows, tokens=tokens))
    if kl:
        phases.append(scoring_items(walk.phase("KL scoring"), "base", shape, where, rows=rows, tokens=tokens))
    return phases


def _micro(train: TrainConfig, per_step: int) -> int:
    return max(1, min(train.micro_batch_size, per_step))


def _sft(walk: _Walk, a: Mapping[str, Any], engine: EngineConfig) -> list[Phase]:
    cfg = a["cfg"]
    prompt = prompt_len(walk.where, engine, cfg.max_response_tokens)
    rows = _micro(cfg.train, cfg.train.sequences_per_step)
    return [walk.train("training", cfg.train, walk.shapes.base, rows=rows, tokens=prompt + cfg.max_response_tokens,
                       scored=rows * cfg.max_response_tokens)]


def _round(walk: _Walk, a: Mapping[str, Any], gft: bool) -> list[Phase]:
    """A round: the policy's sampling, then the train phase over the round's groups (GRPO: with the reference
    model when beta > 0)."""
    cfg, engine, shape = a["cfg"], a["engine"], walk.shapes.base
    n = cfg.policy if gft else cfg.num_generations
    new = min(cfg.sampling.max_new_tokens, cfg.max_response_tokens)
    members = cfg.expert + cfg.teacher + cfg.policy if gft else cfg.num_generations
    response = cfg.max_response_tokens if gft and (cfg.expert or cfg.teacher) else new
    tokens = prompt_len(walk.where, engine, new) + response
    rows = _micro(cfg.train, cfg.prompts_per_round * members // cfg.minibatches_per_round)
    reference = shape if not gft and a.get("reference") is not None else None
    phases = [walk.sample("sampling", "policy", shape, engine, n=n, max_new_tokens=new,
                          prompts=cfg.prompts_per_round)] if n > 0 else []
    return phases + [walk.train("training", cfg.train, shape, rows=rows, tokens=tokens, scored=rows * response,
                                reference=reference)]


def _phases(walk: _Walk, call: PlanCall, engine: EngineConfig) -> list[Phase]:
    a = call.arguments
    if call.stage == "bootstrap_models":
        return _bootstrap(walk, a["synth"])
    if call.stage == "teacher_sample":
        return _teacher(walk, a)
    if call.stage == "evaluate":
        return _evaluate(walk, a)
    if call.stage == "sft":
        return _sft(walk, a, engine)
    if call.stage in ("gft_round", "grpo_round"):
        return _round(walk, a, call.stage == "gft_round")
    return [walk.phase("reading")]  # prepare_data and any stage that loads no model


def plan_memory(calls: Sequence[PlanCall], shapes: Shapes, *, cuda: bool = False, prompt_tokens: int | None = None,
                keep_engines: bool = False, engine: EngineConfig = EngineConfig(), tracking: bool = True) -> MemoryPlan:
    """Every call's expected peak per device, in run order. `prompt_tokens`: the longest rendered prompt when
    the prompts are known (else engine.max_model_len bounds it); `cuda`: engines and trainers on the GPU (else
    everything is the process's RSS); `keep_engines`: the old lifetime, every engine kept to the end and freed
    memory never returned to the system (no `malloc_trim`), so a stage's RSS starts at the largest before it;
    `engine`: the run's engine settings (SFT's prompt bound); `tracking`: MLflow in the process."""
    where = Where(cuda, prompt_tokens, BASELINE_CPU_GB + (TRACKING_CPU_GB if tracking else 0.0))
    walk, peaks = _Walk(shapes, where, keep_engines), []
    before = 0.0  # the process's planned peak so far
    for i, call in enumerate(calls):
        walk.enter(ROLES.get(call.stage, frozenset()), {r for c in calls[i + 1:] for r in ROLES.get(c.stage, ())})
        phases = _phases(walk, call, engine)
        for device in ("cpu", "cuda") if cuda else ("cpu",):
            best = max(phases, key=lambda p: p.total(device))
            items = list(best.items[device])
            if keep_engines and device == "cpu" and before > best.total(device):
                items.append(Item("heap kept from earlier stages (never trimmed)", before - best.total(device)))
            if items:
                peaks.append(StagePeak(i, call.label, call.stage, device, best.name, tuple(items)))
                before = max(before, sum(it.gb for it in items)) if device == "cpu" else before
    return MemoryPlan(tuple(peaks))


def check_budget(plan: MemoryPlan, *, cpu_gb: float | None = None, gpu_gb: float | None = None) -> None:
    """Refuse a plan whose stage exceeds a declared budget (None: no budget for that device), naming the first
    such stage, the device, its planned peak and its largest item."""
    budgets = {"cpu": cpu_gb, "cuda": gpu_gb}
    for peak in plan.stages:
        budget = budgets[peak.device]
        if budget is not None and peak.total > budget:
            setting = "memory.cpu_gb" if peak.device == "cpu" else "memory.gpu_gb"
            raise MemoryBudgetError(
                f"memory plan: stage {peak.label} ({peak.stage}, {peak.phase}) needs about {peak.total:.2f} GB on "
                f"{peak.device}, over the budget {setting} = {budget:g} GB; its largest item is "
                f"{peak.largest.name} ({peak.largest.gb:.2f} GB). {_remedy(peak)} or raise the budget; "
                f"`gft run --dry-run` prints every stage's plan")


def _remedy(peak: StagePeak) -> str:
    """What bounds a stage's largest item."""
    name = peak.largest.name
    if name.startswith(("activations", "logits", "kept logits")):
        return ("Bound the training micro-batch (train.gradient_checkpointing = true keeps one layer's activations, "
                "or a smaller micro_batch_size / micro_batch_tokens, logprob_chunk_size)")
    if "engine" in name or "KV cache" in name:
        return "Lower the engine's share (engine.batch_size, max_new_tokens, kv_cache_gib, dtype)"
    return "Lower what drives it (micro_batch_size, engine.batch_size, max_new_tokens, the model)"


def plan_run(cfg: RunConfig, calls: Sequence[Any], shapes: Shapes, *, cuda: bool, prompt_tokens: int | None,
             keep_engines: bool = False) -> MemoryPlan:
    """The plan of a run's bound stage calls (anything with `.stage` and `.arguments`, in run order), labelled
    by stage and round ("gft/0"), with the run's engine and tracking settings."""
    labelled = [PlanCall(f"{c.stage.removesuffix('_round')}/{c.arguments['round_idx']}" if "round_idx" in c.arguments
                         else c.stage, c.stage, c.arguments) for c in calls]
    return plan_memory(labelled, shapes, cuda=cuda, prompt_tokens=prompt_tokens, keep_engines=keep_engines,
                       engine=cfg.engine, tracking=cfg.tracking.enabled)


def check(cfg: RunConfig, peaks: Sequence[Sequence[StagePeak]]) -> None:
    """Refuse a plan (each planned call's peaks) over a budget of `cfg.memory`; a budget without a plan (a model's
    config.json unreadable here) is refused too."""
    budget = cfg.memory
    if budget.cpu_gb is None and budget.gpu_gb is None:
        return
    if not any(peaks):
        raise MemoryBudgetError("memory.cpu_gb/gpu_gb are set but no memory plan could be made (a model's "
                                "config.json is not readable here; see the log): unset them or make it readable")
    check_budget(MemoryPlan(tuple(p for call in peaks for p in call)), cpu_gb=budget.cpu_gb, gpu_gb=budget.gpu_gb)
