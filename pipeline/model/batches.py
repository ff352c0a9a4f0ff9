"""Training data: examples, their collation into padded or packed micro-batches, and step plans.

An `Example` is one response with its prompt context and advantage (one float or one per token; GRPO adds
per-token old/reference log-probs and importance weights). `plan_step` turns one optimizer step's example
indices into this process's micro-batches and the step's global token totals; the order is a pure function
of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.config import TrainConfig

__all__ = ["Example", "TokenBatch", "StepTotals", "check_example", "collate_padded", "collate_packed", "step_order",
           "plan_step"]



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


def check_example(i: int, ex: Example) -> None:
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
        micro = collate_packed(examples, local, pad_id, cfg.micro_batch_tokens)
        if _sharded(cfg, world) and len({len(collate_packed(examples, list(indices)[r::world], pad_id,
                                                            cfg.micro_batch_tokens)) for r in range(world)}) > 1:
            raise ValueError("strategy fsdp with packing: the processes' shares of this step pack into different "
                             "row counts, and FSDP2's gathers need every process to run as many forwards; "
                             "train padded (packing = false) or with DDP")
        return micro, totals
    if _sharded(cfg, world):
        return _even_micro_batches(examples, indices, local, cfg.micro_batch_size, world, pad_id), totals
    size = cfg.micro_batch_size
    return [collate_padded(examples, local[s:s + size], pad_id) for s in range(0, len(local), size)], totals


def _sharded(cfg: TrainConfig, world: int) -> bool:
    return cfg.launch.strategy == "fsdp" and world > 1


def _even_micro_batches(examples: Sequence[Example], indices: Sequence[int], local: list[int], size: int, world: int,
                        pad_id: int) -> list[TokenBatch]:
    """Under FSDP2 every process runs as many forwards (each gathers the shards): the largest share's micro-batch
    count on every process, each share split into that many near-equal micro-batches of at most `size`."""
    count = math.ceil(math.ceil(len(indices) / world) / size)
    if len(local) < count:
        raise ValueError(f"strategy fsdp: a step of {len(indices)} sequences over {world} processes leaves a "
                         f"process fewer sequences ({len(local)}) than micro-batches ({count}); raise "
                         "micro_batch_size or make the step divisible by the processes")
    cuts = [j * len(local) // count for j in range(count + 1)]
    return [collate_padded(examples, local[a:b], pad_id) for a, b in zip(cuts, cuts[1:])]
