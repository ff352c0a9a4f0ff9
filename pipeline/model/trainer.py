"""The trainer on `accelerate`: `make_trainer`, `train_step` (one optimizer step), checkpoints and saving.

The loop over steps (`run_steps`, `fit`) lives in `pipeline.model.loop`. One optimizer step consumes
`sequences_per_step` examples (the global batch). Every process sees the same step plan, takes its strided share and
splits it into micro-batches (padded rows, or packed rows without pad tokens). Each micro-batch loss is a token sum
divided by the step's global token count, so gradient accumulation and data parallelism give the gradient of one big
batch; DDP averages over processes, so the loss is scaled by the process count before backward. The data order is a
pure function of (seed, step), so a checkpoint of model, optimizer, scheduler, RNG and step number resumes exactly.
Examples and step plans live in `pipeline.model.batches`; the token scorer and the objectives in
`pipeline.model.scoring`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from torch import Tensor, nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from pipeline.model import attention
from pipeline.config import TrainConfig
from pipeline.model.batches import StepTotals, TokenBatch
from pipeline.algo.losses import LossOutput
from pipeline.model.scoring import Objective, ScoredTokens, TokenScorer

__all__ = ["Trainer", "Progress", "NonFiniteError", "StepResult", "make_trainer", "accumulate_gradients", "train_step",
           "save_model", "full_weights", "full_tensor"]


class NonFiniteError(FloatingPointError):
    """A NaN or inf in log-probs, loss or gradients; the message names the step and the example rows."""


# ---------------------------------------------------------------------------------------------------------
# The trainer: accelerate objects, one step, the loop
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Optimizer steps taken; checkpointed with the model so the data position resumes exactly."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


@dataclass
class Trainer:
    """The prepared accelerate objects of one training run."""

    accelerator: Accelerator
    scorer: nn.Module  # TokenScorer, wrapped by accelerate (DDP when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress = field(default_factory=Progress)
    varlen: bool = False  # packed micro-batches pass their sequence boundaries to the attention
    sharded: bool = False  # FSDP2: parameters, gradients and optimizer state are DTensor shards

    @property
    def model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.scorer).lm


def _accelerator(precision: str) -> Accelerator:
    cpu = not torch.cuda.is_available()
    mixed = "bf16" if precision == "bf16" or (precision == "auto" and not cpu) else "no"
    state = AcceleratorState._shared_state  # a process-wide singleton in accelerate
    if state and state.get("_mixed_precision") != mixed and PartialState().num_processes == 1:
        # One process may train stages at different precisions; accelerate would refuse the change.
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mixed)


def make_trainer(model: nn.Module, cfg: TrainConfig, total_steps: int) -> Trainer:
    """AdamW, the warmup schedule and the accelerate wrapping for `model`."""
    accelerator = _accelerator(cfg.precision)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    varlen = cfg.packing and cfg.packed_attention == "varlen"
    scorer = TokenScorer(model, chunk_size=cfg.logprob_chunk_size, compiled=cfg.compile, varlen=varlen,
                         keep_logits=cfg.keep_logits, compile_scope=cfg.compile_scope)
    sharded = cfg.launch.strategy == "fsdp" and accelerator.num_processes > 1
    offload = sharded and cfg.launch.cpu_offload
    if sharded:  # before the optimizer: it must hold the sharded parameters
        _shard(scorer, bf16=accelerator.mixed_precision == "bf16", offload=offload)
    params = [p for p in scorer.parameters() if p.requires_grad]
    fused = (accelerator.device.type == "cuda" and not offload) or None  # offloaded shards step on CPU
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=fused)
    make = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_constant_schedule_with_warmup
    kwargs = {"num_training_steps": total_steps} if cfg.schedule == "cosine" else {}
    scheduler = make(optimizer, num_warmup_steps=cfg.warmup_steps, **kwargs)
    if not sharded:  # DDP (or one process); an FSDP2 module is not wrapped again
        scorer, optimizer = accelerator.prepare(scorer, optimizer)
    trainer = Trainer(accelerator, scorer, optimizer, scheduler, varlen=varlen, sharded=sharded)
    # The scheduler stays unprepared: accelerate's wrapper steps it once per process, not once per step.
    # Training state is saved by pipeline.model.checkpoint (no pickles), not accelerate's save_state.
    return trainer


def _shard(scorer: nn.Module, *, bf16: bool, offload: bool = False) -> None:
    """FSDP2 in place: `fully_shard` of every decoder layer (the model's `_no_split_modules` classes), then of the
    scorer, whose forward computes the log-probs from the root's parameters (embeddings, final norm, output
    projection), all-gathered for its duration. Under bf16, compute in bf16 with float32 gradient reduction;
    with `offload`, the shards live in CPU memory between uses (`CPUOffloadPolicy`)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    kept = CPUOffloadPolicy() if offload else OffloadPolicy()
    kinds = set(getattr(scorer.lm, "_no_split_modules", None) or [])
    layers = [m for m in scorer.lm.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(f"strategy fsdp: {type(scorer.lm).__name__} names no decoder layer class "
                         "(_no_split_modules) to shard")
    for layer in layers:
        fully_shard(layer, mp_policy=policy, offload_policy=kept)
    fully_shard(scorer, mp_policy=policy, offload_policy=kept)


def full_tensor(x: Tensor) -> Tensor:
    """A DTensor's whole value (a collective: every process calls it); any other tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the device without waiting for the GPU: a plain copy from pageable memory synchronizes
    the CUDA stream, so on CUDA the tensor is pinned and copied asynchronously."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _score(trainer: Trainer, mb: TokenBatch) -> ScoredTokens:
    """Score one micro-batch. The scored positions are found, and their per-token fields picked, on the host,
    and every copy is asynchronous: nothing here waits for the GPU."""
    device = trainer.accelerator.device
    positions = mb.loss_mask.reshape(-1).nonzero()[:, 0]  # [M] flat indices into R * L
    packed = None
    if trainer.varlen and mb.attention_mask is None:  # boundaries computed on the host, copied once
        packed = attention.packed_lengths(mb.position_ids)
        packed["cu_seq_lens_q"] = _to_device(packed["cu_seq_lens_q"], device)
    logprobs, entropy = trainer.scorer(
        **_model_inputs(mb, device), targets=_to_device(mb.targets, device), loss_mask=None, packed=packed,
        positions=_to_device(positions, device))
    names = ("advantages", "rows", "old_logprobs", "ref_logprobs", "is_weights")
    flat = {name: None if getattr(mb, name) is None else _to_device(getattr(mb, name).reshape(-1)[positions], device)
            for name in names}  # each [M] or None, picked on the host
    return ScoredTokens(logprobs=logprobs, entropy=entropy, mask=torch.ones_like(logprobs, dtype=torch.bool),
                        **flat)


def _model_inputs(mb: TokenBatch, device: torch.device) -> dict[str, Tensor | None]:
    """input_ids, plus position ids and attention mask where they say more than the model's defaults. A padded
    micro-batch without pad positions has an all-ones mask and 0..L-1 positions in every row: passing neither
    lets SDPA take its causal fast path (under torch.compile, transformers cannot see that a mask is all ones and
    builds an explicit one). Decided on the host copy: no device sync."""
    full = mb.attention_mask is not None and bool(mb.attention_mask.all())
    return {"input_ids": _to_device(mb.input_ids, device),
            "position_ids": None if full else _to_device(mb.position_ids, device),
            "attention_mask": None if full or mb.attention_mask is None else _to_device(mb.attention_mask, device)}


class _FiniteChecks:
    """The finite checks of one step's log-probs and losses, queued on the device and read once per step
    (reading each one would make the host wait for the GPU after every micro-batch)."""

    def __init__(self, device: torch.device):
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # [] any non-finite value so far
        self.found: list[tuple[str, Tensor, Tensor]] = []  # (what, non-finite flags [M] or [], rows [M])

    def add(self, what: str, values: Tensor, rows: Tensor) -> None:
        flags = ~torch.isfinite(values.detach())
        self.bad |= flags.any()
        self.found.append((what, flags, rows))

    def raise_first(self, step: int) -> None:
        """NonFiniteError naming the first check that failed, in micro-batch order (reads: error path only)."""
        for what, flags, rows in self.found:
            if flags.any():
                where = sorted(set((rows[flags] if flags.shape == rows.shape else rows).tolist()))
                raise NonFiniteError(f"step {step}: non-finite {what} in example rows {where[:20]}")


def _raise_non_finite(trainer: Trainer, checks: _FiniteChecks, step: int,
                      grad_norm: float | None = None) -> None:
    """Clear the step's gradients (every micro-batch's backward has run) and raise: the first non-finite
    log-probs or loss of this process, else the gradient norm."""
    trainer.optimizer.zero_grad(set_to_none=True)
    checks.raise_first(step)
    raise NonFiniteError(f"step {step}: non-finite gradient norm {grad_norm}")


@dataclass(frozen=True)
class StepResult:
    """Metrics of one optimizer step, averaged over all its tokens on all processes."""

    metrics: dict[str, float]


@dataclass
class _StepSums:
    """This process's sums over its micro-batches, on the device: the loss, each metric times its weight (its
    token count, or the weight the objective gives it in `LossOutput.weights`, e.g. its sequence count), and
    the weight sums of the metrics the objective weighs itself."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)

    def add(self, out: LossOutput, tokens: int) -> None:
        self.loss += out.loss.detach().double()
        for name, value in out.metrics.items():  # weighted, so micro-batch sizes do not matter
            weight = out.weights[name].double() if name in out.weights else tokens
            self.metrics[name] = self.metrics.get(name, 0.0) + value.double() * weight
            if name in out.weights:
                self.weights[name] = self.weights.get(name, 0.0) + weight


def _accumulate(trainer: Trainer, micro_batches: Sequence[TokenBatch], objective: Objective,
                totals: StepTotals) -> tuple[_StepSums, _FiniteChecks]:
    """Forward/backward over this process's micro-batches, syncing gradients on the last one, without reading
    anything back from the device: the loss and weighted metric sums, and the queued finite checks."""
    acc, world = trainer.accelerator, trainer.accelerator.num_processes
    checks = _FiniteChecks(acc.device)
    sums = _StepSums(loss=torch.zeros((), device=acc.device, dtype=torch.float64))
    for i, mb in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with nullcontext() if sync else acc.no_sync(trainer.scorer):
            scored = _score(trainer, mb)
            checks.add("log-probs", scored.logprobs, scored.rows)
            out = objective(scored, totals)
            checks.add("loss", out.loss, scored.rows)
            acc.backward(out.loss * world)  # DDP averages gradients over processes; we want their sum
        sums.add(out, scored.logprobs.numel())
    return sums, checks


def accumulate_gradients(trainer: Trainer, micro_batches: Sequence[TokenBatch], objective: Objective,
                         totals: StepTotals, *, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward/backward over this process's micro-batches, syncing gradients on the last one.
    Returns the summed loss and token-weighted metric sums of this process. A non-finite log-prob or loss
    raises NonFiniteError after the last backward (the finite checks are read once), gradients cleared."""
    sums, checks = _accumulate(trainer, micro_batches, objective, totals)
    if checks.bad.item():
        _raise_non_finite(trainer, checks, step)
    return sums.loss, sums.metrics


def train_step(trainer: Trainer, micro_batches: Sequence[TokenBatch], objective: Objective,
               totals: StepTotals, *, max_grad_norm: float | None, step: int) -> StepResult:
    """One optimizer step: accumulate gradients, clip, AdamW, advance the schedule. The host waits for the
    GPU once, before the optimizer step, reading the finite checks, gradient norm and metrics together."""
    sums, checks = _accumulate(trainer, micro_batches, objective, totals)
    grad_norm = full_tensor(trainer.accelerator.clip_grad_norm_(trainer.scorer.parameters(),
                                                                max_grad_norm or float("inf")))
    lr = trainer.scheduler.get_last_lr()[0]
    metrics, bad = _reduce_metrics(trainer.accelerator, sums, totals, grad_norm, lr, checks.bad)
    if bad or not math.isfinite(metrics["grad_norm"]):
        _raise_non_finite(trainer, checks, step, metrics["grad_norm"])
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return StepResult(metrics=metrics)


def _reduce_metrics(acc: Accelerator, sums: _StepSums, totals: StepTotals, grad_norm: Tensor, lr: float,
                    bad: Tensor) -> tuple[dict[str, float], bool]:
    """The step's metrics (summed over processes) and this process's non-finite flag, read in one transfer. A
    metric is its weighted sum over the step's weight: its tokens, or the weights the objective gave it."""
    names, weighed = sorted(sums.metrics), sorted(sums.weights)
    parts = [sums.loss] + [sums.metrics[n] for n in names] + [sums.weights[n] for n in weighed]
    local = torch.stack([torch.as_tensor(x, device=acc.device, dtype=torch.float64) for x in parts])  # [1 + K + W]
    total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
    read = torch.cat([total, grad_norm.double().reshape(1), bad.double().reshape(1)]).tolist()  # [K + W + 3]
    weight = {name: read[1 + len(names) + k] for k, name in enumerate(weighed)}
    metrics = {name: read[1 + k] / max(weight.get(name, totals.tokens), 1) for k, name in enumerate(names)}
    metrics.update(loss=read[0], grad_norm=read[-2], lr=lr, tokens=float(totals.tokens),
                   sequences=float(totals.sequences))
    return metrics, read[-1] > 0


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def full_weights(trainer: Trainer) -> dict[str, Tensor] | None:
    """The model's whole state dict: gathered from the shards under FSDP2 (a collective: every process calls it;
    only the main process gets it, on the host), else the live one."""
    if not trainer.sharded:
        return trainer.model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer.scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in full.items()} if trainer.accelerator.is_main_process else None


def _aliases(model: nn.Module) -> set[str]:
    """Names under which a parameter already named earlier appears again (tied embeddings)."""
    first: dict[int, str] = {}
    again = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            again.add(name)
        else:
            first[id(p)] = name
    return again


def _save_pretrained(model: nn.Module, folder: Path, dtype: torch.dtype | None,
                     state: dict[str, Tensor] | None = None) -> None:
    """save_pretrained, with the floating-point tensors cast to `dtype` on the host (the live weights stay as they
    are: float32 master weights keep their precision); `state`: the gathered weights of a sharded model."""
    if state is None and (dtype is None or dtype == next(model.parameters()).dtype):
        model.save_pretrained(folder)
        return
    state = model.state_dict() if state is None else state
    dtype = dtype or next(v.dtype for v in state.values() if v.is_floating_point())
    aliases = _aliases(model)  # a tied output projection is saved once, as save_pretrained does
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()
             if k not in aliases}
    model.save_pretrained(folder, state_dict=state)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")  # the saved weights' dtype, not the live ones'
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model(trainer: Trainer, path: Path, tokenizer=None, *, dtype: torch.dtype | None = None) -> Path:
    """The trained model (and tokenizer) as a Hugging Face folder in `dtype` (None: the weights' own), written
    atomically by the main process."""
    acc = trainer.accelerator
    acc.wait_for_everyone()
    state = full_weights(trainer) if trainer.sharded else None  # every process takes part in the gather
    if acc.is_main_process:
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        _save_pretrained(trainer.model, tmp, dtype, state)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    acc.wait_for_everyone()
    return path


_LOAD_ONLY = ("local_files_only", "cache_dir", "force_download", "token", "revision")
"""How a tokenizer was loaded (HF_HUB_OFFLINE sets local_files_only): transformers saves these kwargs with it."""


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's files without how it was loaded, so the same training writes the same bytes online and
    offline (they would differ in tokenizer_config.json's local_files_only)."""
    kept = {k: tokenizer.init_kwargs.pop(k) for k in _LOAD_ONLY if k in tokenizer.init_kwargs}
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.init_kwargs.update(kept)

