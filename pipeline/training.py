"""The training loop on `accelerate`: `fit()` reads like the algorithm, `train_step()` beside it.

One optimizer step consumes `sequences_per_step` examples (the global batch). Every process sees the same
step plan, takes its strided share and splits it into micro-batches (padded rows, or packed rows without pad
tokens). Each micro-batch loss is a token sum divided by the step's global token count, so gradient
accumulation and data parallelism give the gradient of one big batch; DDP averages over processes, so the
loss is scaled by the process count before backward. The data order is a pure function of (seed, step), so
a checkpoint of model, optimizer, scheduler, RNG and step number resumes exactly.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import Tensor, nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from pipeline import attention, losses
from pipeline.config import TrainConfig
from pipeline.losses import (
    Aggregation, LossOutput, dft_loss, gft_loss, grpo_loss, sft_loss, token_logprobs, token_logprobs_from_logits,
)
from pipeline.progress import bar as progress_bar_of

__all__ = [
    "Example", "TokenBatch", "ScoredTokens", "StepTotals", "Objective", "TokenScorer", "Trainer",
    "NonFiniteError", "collate_padded", "collate_packed", "plan_step", "make_trainer", "accumulate_gradients", "train_step", "fit",
    "gft_objective", "sft_objective", "dft_objective", "grpo_objective", "FitResult", "ResponseScores",
    "score_responses",
]


class NonFiniteError(FloatingPointError):
    """A NaN or inf in log-probs, loss or gradients; the message names the step and the example rows."""


# ---------------------------------------------------------------------------------------------------------
# Data: examples, collation, step plans
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One response with its prompt context. `advantage` is one float or one per response token; the optional
    per-token fields feed GRPO: old log-probs of the ratio, reference log-probs of the KL, importance weights."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: float | Sequence[float] = 1.0
    old_logprobs: Sequence[float] | None = None
    ref_logprobs: Sequence[float] | None = None
    is_weights: Sequence[float] | None = None


@dataclass(frozen=True)
class TokenBatch:
    """Rows of prompt + response tokens. Position t of a row predicts `targets[r, t]`; `loss_mask` marks the
    positions whose target is a response token. `rows` gives the example index of every position (-1: pad)."""

    input_ids: Tensor  # [R, L]
    position_ids: Tensor  # [R, L]
    attention_mask: Tensor | None  # [R, L] in padded mode; None when packed
    targets: Tensor  # [R, L]
    loss_mask: Tensor  # [R, L] bool
    advantages: Tensor  # [R, L]
    rows: Tensor  # [R, L] long
    old_logprobs: Tensor | None  # [R, L]
    ref_logprobs: Tensor | None = None  # [R, L]
    is_weights: Tensor | None = None  # [R, L]

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


def _check_example(i: int, ex: Example) -> None:
    if len(ex.response_ids) == 0:
        raise ValueError(f"example {i}: field 'response_ids' is empty")
    if len(ex.prompt_ids) == 0:
        raise ValueError(f"example {i}: field 'prompt_ids' is empty (a response needs context to be predicted)")
    for name in ("advantage",) + _OPTIONAL:
        value = getattr(ex, name)
        if value is None:
            continue
        values = [value] if isinstance(value, (int, float)) else list(value)
        if not isinstance(value, (int, float)) and len(values) != len(ex.response_ids):
            raise ValueError(f"example {i}: field {name!r} has {len(values)} values for "
                             f"{len(ex.response_ids)} response tokens")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"example {i}: field {name!r} holds a NaN or inf")


def _row_arrays(i: int, ex: Example) -> dict[str, list]:
    """Unshifted per-position lists for one example: position t predicts token t + 1."""
    ids = list(ex.prompt_ids) + list(ex.response_ids)
    n_p, n_r = len(ex.prompt_ids), len(ex.response_ids)
    adv = [float(ex.advantage)] * n_r if isinstance(ex.advantage, (int, float)) else [float(a) for a in ex.advantage]
    pad = [0.0] * (n_p - 1)
    out = {
        "input_ids": ids[:-1], "position_ids": list(range(len(ids) - 1)), "targets": ids[1:],
        "loss_mask": [False] * (n_p - 1) + [True] * n_r, "advantages": pad + adv, "rows": [i] * (len(ids) - 1),
    }
    for name in _OPTIONAL:
        value = getattr(ex, name)
        out[name] = pad + ([_FILL[name]] * n_r if value is None else [float(x) for x in value])
    return out


_OPTIONAL = ("old_logprobs", "ref_logprobs", "is_weights")  # per-token floats an example may carry
_FILL = {"input_ids": 0, "position_ids": 0, "targets": 0, "loss_mask": False, "advantages": 0.0,
         "old_logprobs": 0.0, "ref_logprobs": 0.0, "is_weights": 1.0, "rows": -1}
_DTYPE = {"loss_mask": torch.bool, "advantages": torch.float32, "old_logprobs": torch.float32,
          "ref_logprobs": torch.float32, "is_weights": torch.float32}


def _present(examples: Sequence[Example], indices: Sequence[int]) -> frozenset[str]:
    """The optional fields the examples carry: all of them or none, per field."""
    out = set()
    for name in _OPTIONAL:
        has = [getattr(examples[i], name) is not None for i in indices]
        if any(has) and not all(has):
            raise ValueError(f"examples {[i for i, h in zip(indices, has) if not h][:10]} lack field {name!r} "
                             f"that others in the same step carry")
        if has and has[0]:
            out.add(name)
    return frozenset(out)


def _to_batch(rows: list[dict[str, list]], pad_id: int, padded: bool, present: frozenset[str]) -> TokenBatch:
    width = max(len(r["input_ids"]) for r in rows)
    cols = {}
    for key, fill in _FILL.items():
        fill = pad_id if key == "input_ids" else fill
        data = [r[key] + [fill] * (width - len(r[key])) for r in rows]
        cols[key] = torch.tensor(data, dtype=_DTYPE.get(key, torch.long))  # [R, L]
    mask = None
    if padded:
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    optional = {name: cols.pop(name) for name in _OPTIONAL}
    optional = {name: value if name in present else None for name, value in optional.items()}
    return TokenBatch(attention_mask=mask, **optional, **cols)


def collate_padded(examples: Sequence[Example], indices: Sequence[int], pad_id: int) -> TokenBatch:
    """One right-padded row per example, with an attention mask."""
    rows = [_row_arrays(i, examples[i]) for i in indices]
    return _to_batch(rows, pad_id, padded=True, present=_present(examples, indices))


def collate_packed(examples: Sequence[Example], indices: Sequence[int], pad_id: int,
                   max_tokens: int) -> list[TokenBatch]:
    """Examples packed in order into single rows of at most `max_tokens` positions (a longer example gets a
    row of its own). Position ids restart at each example, which transformers turns into a block-diagonal
    causal mask, so no position attends across examples and no compute goes to pad tokens."""
    present = _present(examples, indices)
    batches, current = [], None
    for i in indices:
        row = _row_arrays(i, examples[i])
        if current is not None and len(current["input_ids"]) + len(row["input_ids"]) <= max_tokens:
            for key in current:
                current[key] += row[key]
            continue
        if current is not None:
            batches.append(_to_batch([current], pad_id, padded=False, present=present))
        current = row
    batches.append(_to_batch([current], pad_id, padded=False, present=present))
    return batches


@dataclass(frozen=True)
class StepTotals:
    """Global counts of one optimizer step (all micro-batches, all processes): the loss normalizers."""

    tokens: int
    sequences: int


def step_order(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: consecutive slices of one seeded permutation per epoch."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, n)
        perm = _permutation(n, seed, epoch)
        out.append(perm[offset])
    return out


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=gen).tolist())


def plan_step(examples: Sequence[Example], indices: Sequence[int], cfg: TrainConfig, *, rank: int,
              world: int, pad_id: int) -> tuple[list[TokenBatch], StepTotals]:
    """This process's micro-batches of one step, and the step's global totals."""
    if len(indices) < world:
        raise ValueError(f"a step of {len(indices)} sequences cannot feed {world} processes")
    totals = StepTotals(tokens=sum(len(examples[i].response_ids) for i in indices), sequences=len(indices))
    local = list(indices)[rank::world]
    if cfg.packing:
        return collate_packed(examples, local, pad_id, cfg.micro_batch_tokens), totals
    size = cfg.micro_batch_size
    return [collate_padded(examples, local[s:s + size], pad_id) for s in range(0, len(local), size)], totals


# ---------------------------------------------------------------------------------------------------------
# Scoring tokens with a causal LM, and objectives
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredTokens:
    """The scored (response) tokens of one micro-batch, flat: every tensor is [M]."""

    logprobs: Tensor
    entropy: Tensor | None
    advantages: Tensor
    old_logprobs: Tensor | None
    rows: Tensor
    mask: Tensor
    ref_logprobs: Tensor | None = None
    is_weights: Tensor | None = None


class Objective(Protocol):
    def __call__(self, scored: ScoredTokens, totals: StepTotals) -> LossOutput: ...


def gft_objective(*, tau: float) -> Objective:
    """GFT with DCR threshold tau, token mean over the step's global token count."""
    def objective(s: ScoredTokens, totals: StepTotals) -> LossOutput:
        return gft_loss(s.logprobs, s.advantages, s.mask, tau=tau, normalizer=totals.tokens, entropy=s.entropy)
    return objective


def sft_objective() -> Objective:
    """Plain SFT (advantages are ignored)."""
    def objective(s: ScoredTokens, totals: StepTotals) -> LossOutput:
        return sft_loss(s.logprobs, s.mask, normalizer=totals.tokens, entropy=s.entropy)
    return objective


def dft_objective() -> Objective:
    """DFT (advantages are ignored)."""
    def objective(s: ScoredTokens, totals: StepTotals) -> LossOutput:
        return dft_loss(s.logprobs, s.mask, normalizer=totals.tokens, entropy=s.entropy)
    return objective


def grpo_objective(*, eps_low: float, eps_high: float, beta: float = 0.0, aggregation: Aggregation = "token_mean",
                   max_response_tokens: int | None = None) -> Objective:
    """GRPO's clipped surrogate over the step's global normalizer: tokens (token_mean), sequences
    (sequence_mean) or sequences x max_response_tokens (constant). A batch without old log-probs is on-policy:
    the old log-probs are the current ones detached, so the ratio is exactly 1 and the gradient is the
    advantage-weighted policy gradient."""
    if aggregation == "constant" and max_response_tokens is None:
        raise ValueError("aggregation 'constant' needs max_response_tokens")

    def objective(s: ScoredTokens, totals: StepTotals) -> LossOutput:
        old = s.logprobs.detach() if s.old_logprobs is None else s.old_logprobs
        normalizer = {"token_mean": totals.tokens, "sequence_mean": totals.sequences,
                      "constant": totals.sequences * (max_response_tokens or 0)}[aggregation]
        return grpo_loss(s.logprobs, old, s.advantages, s.mask, eps_low=eps_low, eps_high=eps_high, beta=beta,
                         ref_logprobs=s.ref_logprobs, aggregation=aggregation, normalizer=normalizer,
                         is_weights=s.is_weights, seq_index=s.rows, entropy=s.entropy)
    return objective


def _plain_head(lm: nn.Module) -> nn.Linear | None:
    """The output projection when logits are exactly `hidden @ W.T + b`; None for softcapped or scaled heads."""
    head = lm.get_output_embeddings()
    cfg = lm.config
    if not isinstance(head, nn.Linear):
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    return head


def _compile_in_place(lm: nn.Module, scope: str, *, whole_model: bool) -> None:
    """torch.compile in place, so parameter names and checkpoints do not change. "layers": each decoder layer,
    one graph that every layer of the same code and shapes reuses (compiling costs about one layer, as
    torchtitan compiles per block); "model": the decoder body (the whole model when `whole_model`), one graph
    of every layer (compiling takes about as many times longer as there are layers)."""
    layers = getattr(lm.get_decoder(), "layers", None)
    if scope == "layers" and isinstance(layers, nn.ModuleList) and len(layers):
        for layer in layers:
            layer.compile(**losses.COMPILE_OPTIONS)
    else:
        (lm if whole_model else lm.get_decoder()).compile(**losses.COMPILE_OPTIONS)


class TokenScorer(nn.Module):
    """Wraps a causal LM so that one forward returns log p and entropy of the scored tokens, flat [M].

    The fused path runs the decoder, keeps only hidden states at scored positions and applies the output
    projection in checkpointed chunks; models whose logits are not a plain projection go through the full
    forward and chunked log-softmax. Wrapping in one module keeps DDP's hooks on the whole computation.
    `compiled` compiles the decoder (`_compile_in_place`: each layer, or the whole body with `compile_scope`
    "model") and the log-prob chunk kernels;
    `varlen` makes packed rows (`packed` given to forward) attend per sequence without a mask tensor;
    `keep_logits` keeps the fused head's logits for backward instead of recomputing them.
    """

    def __init__(self, lm: nn.Module, *, chunk_size: int = 2048, fused: bool | None = None,
                 compiled: bool = False, varlen: bool = False, keep_logits: bool = False,
                 compile_scope: str = "layers"):
        super().__init__()
        self.lm, self.chunk_size, self.compiled, self.keep_logits = lm, chunk_size, compiled, keep_logits
        self.fused = _plain_head(lm) is not None if fused is None else fused
        self.varlen = varlen and not getattr(lm.config, "use_sliding_window", False)
        if self.varlen:  # behaves as SDPA unless a forward passes sequence boundaries
            lm.config._attn_implementation = attention.register()
        if compiled:
            _compile_in_place(lm, compile_scope, whole_model=not self.fused)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None, attention_mask: Tensor | None,
                targets: Tensor, loss_mask: Tensor | None, packed: attention.PackedLengths | None = None,
                positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """log p and entropy [M] of the scored positions: `loss_mask` [R, L], or `positions` [M], the flat
        indices of its true entries found on the host (a mask on the device must be counted there: a sync)."""
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        if packed is not None and self.varlen:  # no mask is built; the attention splits the sequences
            inputs.update(packed)
        index = loss_mask.reshape(-1).nonzero()[:, 0] if positions is None else positions  # [M] into R * L
        labels = targets.reshape(-1)[index]  # [M]
        if self.fused:
            hidden = self.lm.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [R, L, H]
            head = self.lm.get_output_embeddings()
            stats = token_logprobs(hidden.flatten(0, 1)[index], head.weight, labels, bias=head.bias,
                                   chunk_size=self.chunk_size, compiled=self.compiled, keep_logits=self.keep_logits)
        else:
            logits = self.lm(**inputs, use_cache=False).logits  # [R, L, V]
            stats = token_logprobs_from_logits(logits.flatten(0, 1)[index], labels, chunk_size=self.chunk_size)
        return stats.logprobs, stats.entropy


@dataclass(frozen=True)
class ResponseScores:
    """Per-response token log-probs and entropies under a model (teacher-forced, no gradient)."""

    logprobs: list[Tensor]  # one [T_k] float tensor per response
    entropy: list[Tensor]  # one [T_k] float tensor per response


@torch.no_grad()
def score_responses(model: nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                    pad_id: int, batch_size: int = 16, chunk_size: int = 2048) -> ResponseScores:
    """log p and entropy of every response token given its prompt, in padded batches on the model's device."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    examples = [Example(p, r) for p, r in zip(prompts, responses)]
    scorer, device = TokenScorer(model, chunk_size=chunk_size), next(model.parameters()).device
    logps, ents = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate_padded(examples, range(start, min(start + batch_size, len(examples))), pad_id)
        mask = batch.loss_mask.to(device)
        lp, ent = scorer(batch.input_ids.to(device), batch.position_ids.to(device),
                         batch.attention_mask.to(device), batch.targets.to(device), mask)
        rows = batch.rows.to(device)[mask]  # [M] example index of every scored token
        for i in range(start, min(start + batch_size, len(examples))):
            logps.append(lp[rows == i].float().cpu())
            ents.append(ent[rows == i].float().cpu())
    return ResponseScores(logprobs=logps, entropy=ents)


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
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=accelerator.device.type == "cuda" or None)
    make = get_cosine_schedule_with_warmup if cfg.schedule == "cosine" else get_constant_schedule_with_warmup
    kwargs = {"num_training_steps": total_steps} if cfg.schedule == "cosine" else {}
    scheduler = make(optimizer, num_warmup_steps=cfg.warmup_steps, **kwargs)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    trainer = Trainer(accelerator, scorer, optimizer, scheduler, varlen=varlen)
    # The scheduler stays unprepared: accelerate's wrapper steps it once per process, not once per step.
    accelerator.register_for_checkpointing(trainer.scheduler, trainer.progress)
    return trainer


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


def _accumulate(trainer: Trainer, micro_batches: Sequence[TokenBatch], objective: Objective,
                totals: StepTotals) -> tuple[Tensor, dict[str, Tensor], _FiniteChecks]:
    """Forward/backward over this process's micro-batches, syncing gradients on the last one, without reading
    anything back from the device: the summed loss, token-weighted metric sums and the queued finite checks."""
    acc, world = trainer.accelerator, trainer.accelerator.num_processes
    checks = _FiniteChecks(acc.device)
    sums: dict[str, Tensor] = {}
    loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with nullcontext() if sync else acc.no_sync(trainer.scorer):
            scored = _score(trainer, mb)
            checks.add("log-probs", scored.logprobs, scored.rows)
            out = objective(scored, totals)
            checks.add("loss", out.loss, scored.rows)
            acc.backward(out.loss * world)  # DDP averages gradients over processes; we want their sum
        loss_sum += out.loss.detach().double()
        for name, value in out.metrics.items():  # token-weighted, so micro-batch sizes do not matter
            sums[name] = sums.get(name, 0.0) + value.double() * scored.logprobs.numel()
    return loss_sum, sums, checks


def accumulate_gradients(trainer: Trainer, micro_batches: Sequence[TokenBatch], objective: Objective,
                         totals: StepTotals, *, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward/backward over this process's micro-batches, syncing gradients on the last one.
    Returns the summed loss and token-weighted metric sums of this process. A non-finite log-prob or loss
    raises NonFiniteError after the last backward (the finite checks are read once), gradients cleared."""
    loss_sum, sums, checks = _accumulate(trainer, micro_batches, objective, totals)
    if checks.bad.item():
        _raise_non_finite(trainer, checks, step)
    return loss_sum, sums


def train_step(trainer: Trainer, micro_batches: Sequence[TokenBatch], objective: Objective,
               totals: StepTotals, *, max_grad_norm: float | None, step: int) -> StepResult:
    """One optimizer step: accumulate gradients, clip, AdamW, advance the schedule. The host waits for the
    GPU once, before the optimizer step, reading the finite checks, gradient norm and metrics together."""
    loss_sum, sums, checks = _accumulate(trainer, micro_batches, objective, totals)
    grad_norm = trainer.accelerator.clip_grad_norm_(trainer.scorer.parameters(), max_grad_norm or float("inf"))
    lr = trainer.scheduler.get_last_lr()[0]
    metrics, bad = _reduce_metrics(trainer.accelerator, loss_sum, sums, totals, grad_norm, lr, checks.bad)
    if bad or not math.isfinite(metrics["grad_norm"]):
        _raise_non_finite(trainer, checks, step, metrics["grad_norm"])
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return StepResult(metrics=metrics)


def _reduce_metrics(acc: Accelerator, loss_sum: Tensor, sums: dict[str, Tensor], totals: StepTotals,
                    grad_norm: Tensor, lr: float, bad: Tensor) -> tuple[dict[str, float], bool]:
    """The step's metrics (summed over processes) and this process's non-finite flag, read in one transfer."""
    names = sorted(sums)
    local = torch.stack([loss_sum] + [torch.as_tensor(sums[n], device=acc.device) for n in names])  # [1 + K]
    total = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
    read = torch.cat([total, grad_norm.double().reshape(1), bad.double().reshape(1)]).tolist()  # [K + 3]
    metrics = {name: read[1 + k] / max(totals.tokens, 1) for k, name in enumerate(names)}
    metrics.update(loss=read[0], grad_norm=read[-2], lr=lr, tokens=float(totals.tokens),
                   sequences=float(totals.sequences))
    return metrics, read[-1] > 0


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    return cfg.num_steps or max(1, math.ceil(cfg.epochs * n_examples / cfg.sequences_per_step))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def _checkpoints(root: Path) -> list[Path]:
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.exists() else []


def save_checkpoint(trainer: Trainer, root: Path, *, keep: int) -> Path:
    """accelerate state (model, optimizer, scheduler, RNG of every process, progress) written to a temp folder
    and renamed into place, so a crash never leaves a half-written checkpoint that resume would pick up."""
    acc = trainer.accelerator
    final = root / f"step-{trainer.progress.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def resume_latest(trainer: Trainer, root: Path) -> Path | None:
    """Load the newest complete checkpoint under root, if any."""
    found = _checkpoints(root)
    if not found:
        return None
    trainer.accelerator.load_state(str(found[-1]))
    return found[-1]


def save_model(trainer: Trainer, path: Path, tokenizer=None) -> Path:
    """The trained model (and tokenizer) as a Hugging Face folder, written atomically by the main process."""
    acc = trainer.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    acc.wait_for_everyone()
    return path


# ---------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """The trainer (its `.model` is the trained model), per-step metrics of this call, last checkpoint."""

    trainer: Trainer
    history: list[dict[str, float]]
    checkpoint: Path | None


def fit(model: nn.Module, examples: Sequence[Example], objective: Objective, cfg: TrainConfig, *,
        pad_id: int, checkpoint_dir: Path | None = None, stop_at_step: int | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None, progress_bar: bool = True) -> FitResult:
    """Train `model` on `examples` for the configured steps, resuming from `checkpoint_dir` when it holds one.

    `stop_at_step` ends this call early (as a preemption would) without changing the schedule.
    """
    for i, ex in enumerate(examples):
        _check_example(i, ex)
    set_seed(cfg.seed)
    steps = total_steps(cfg, len(examples))
    trainer = make_trainer(model, cfg, steps)
    acc = trainer.accelerator
    last = resume_latest(trainer, checkpoint_dir) if checkpoint_dir is not None else None
    end = min(steps, stop_at_step or steps)
    history: list[dict[str, float]] = []
    bar = progress_bar_of(total=end, initial=trainer.progress.step, desc="train",
                          disable=not (progress_bar and acc.is_main_process))
    while trainer.progress.step < end:
        step = trainer.progress.step
        indices = step_order(len(examples), step, cfg.sequences_per_step, cfg.seed)
        micro, totals = plan_step(examples, indices, cfg, rank=acc.process_index, world=acc.num_processes,
                                  pad_id=pad_id)
        result = train_step(trainer, micro, objective, totals, max_grad_norm=cfg.max_grad_norm, step=step)
        trainer.progress.step = step + 1
        history.append({"step": float(step + 1), **result.metrics})
        bar.update(1)
        bar.set_postfix(loss=f"{result.metrics['loss']:.4f}", gnorm=f"{result.metrics['grad_norm']:.3f}")
        if on_step is not None and acc.is_main_process and (step + 1) % cfg.log_every == 0:
            on_step(step + 1, result.metrics)
        if checkpoint_dir is not None and _should_save(cfg, step + 1, end, steps):
            last = save_checkpoint(trainer, checkpoint_dir, keep=cfg.keep_checkpoints)
    bar.close()
    return FitResult(trainer=trainer, history=history, checkpoint=last)


def _should_save(cfg: TrainConfig, done: int, end: int, steps: int) -> bool:
    return done == end or (cfg.save_every is not None and done % cfg.save_every == 0)
