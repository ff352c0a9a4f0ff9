"""Sampling that drops finished rows: the HF engine's decoding loop for uneven completion lengths.

transformers' `generate` keeps every row of its batch until the longest completion ends, so when completions
stop early and unevenly (GFT and GRPO rollouts; geometric lengths in `bench/engines.py`) most of each step is
spent on rows that are already done. `sample_compacting` runs the same decoding with a dynamic KV cache and,
whenever at least `compact_at` of the live rows have finished, keeps only the unfinished rows: cache, mask and
positions are index-selected, so later steps compute the live rows only. Each prompt is prefilled once and
its KV cache repeated for its n completions (`generate` prefills every copy).

The distribution is `generate`'s: the raw logits of the last position, divided by the temperature
(transformers' `TemperatureLogitsWarper`), cut to the nucleus (`TopPLogitsWarper`, at least one token kept),
softmax and one draw per row; temperature 0 is greedy (argmax). On CPU the draw is by inverse CDF
(`draw_from`): a uniform per row against the float64 cumulative sum. It has `torch.multinomial`'s distribution
for one sample, but multinomial draws an exponential per vocabulary entry: over SmolLM2's 49,152 tokens and 32
rows that is about 50 ms of one CPU core per decoding step, against about 5 ms here (a tenth of a 135M model's
step). On a GPU it is `torch.multinomial`. The log-prob recorded for each
sampled token is that of the raw logits (temperature 1, no top-p), as every engine reports. The random
stream differs from `generate`'s once rows are dropped (fewer rows draw per step), so a seed gives
reproducible samples of this loop, not `generate`'s samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Decoded", "sample_compacting", "draw_from", "draw_token", "logit_warpers"]


@dataclass(frozen=True)
class Decoded:
    """Per input row: the sampled ids up to and including the first eos, their raw log-probs, and how many
    times the batch was compacted."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    compactions: int


def logit_warpers(temperature: float, top_p: float) -> list:
    """transformers' temperature and top-p warpers for these settings (none at temperature 0 or for no-ops)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    if temperature == 0:  # greedy: no distribution to shape
        return []
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    return warpers + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])


def draw_token(logits: Tensor, temperature: float, warpers: list) -> Tensor:
    """One token per row [r] from raw float32 logits [r, V]: argmax at temperature 0, else a draw from the warped
    distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits
    for warp in warpers:
        scores = warp(None, scores)
    return draw_from(scores.softmax(-1))


ROWS_PER_DRAW = 64
"""Rows whose float64 cumulative sums are held at once (64 x 152k vocabulary: 78 MB)."""


def draw_from(probs: Tensor) -> Tensor:
    """One index per row [r] of probabilities [r, V] (rows need not sum to exactly 1). On CPU by inverse CDF: the
    first index whose cumulative probability exceeds a uniform times the row's total, in float64 so that no
    token's share of the unit interval is rounded away; a zero-probability index is never drawn (a right-side
    search skips the flat stretches of the cumulative sum; a uniform that rounds onto the total is moved to the
    row's last positive index). On a GPU, `torch.multinomial`, which is fast there. The global generator."""
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1)[:, 0]
    return torch.cat([_inverse_cdf(chunk) for chunk in probs.split(ROWS_PER_DRAW)])


def _inverse_cdf(probs: Tensor) -> Tensor:
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [r, V]
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64) * cdf[:, -1:]  # [r, 1]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)  # [r, 1]
    stray = probs.gather(-1, idx)[:, 0] == 0
    if stray.any():
        positive = probs[stray] > 0  # [s, V]
        idx[stray, 0] = probs.shape[-1] - 1 - positive.flip(-1).int().argmax(-1)
    return idx[:, 0]


def _last_only(model) -> dict[str, int]:
    """`logits_to_keep=1` where the model's forward takes it (transformers' causal LMs do)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids [R, L] of left-padded rows: 0 at each row's first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def sample_compacting(model, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int, temperature: float,
                      top_p: float, eos_ids: Collection[int], copies: int = 1, compact_at: float = 0.25) -> Decoded:
    """Sample `copies` completions of up to `max_new_tokens` for each row of the left-padded `input_ids` [B, L]
    (rows b * copies + k of the result); each prompt is prefilled once and its cache repeated. Finished rows
    leave the batch once `compact_at` of the live rows are done (1.0: only when all are)."""
    last = _last_only(model)  # logits of the last position only, as `generate` asks: not [B, L, V]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask),
                use_cache=True, **last)
    cache, mask = out.past_key_values, attention_mask.repeat_interleave(copies, 0)  # mask [R, L], R = B * copies
    if copies > 1:
        cache.batch_repeat_interleave(copies)
        out.logits = out.logits[:, -1:].repeat_interleave(copies, 0)  # [R, 1, V]
    rows = mask.shape[0]
    next_pos = mask.long().sum(-1)  # [r] position of each row's next token: its count of real tokens
    live = torch.arange(rows, device=input_ids.device)  # [r] input row of each live row
    eos = torch.tensor(sorted(eos_ids), device=input_ids.device)
    warpers, compactions = logit_warpers(temperature, top_p), 0
    steps: list[tuple[Tensor, ...]] = []  # (live rows, tokens, raw log-probs, still running) per step, on device
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)  # [r] finished, by live row
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()  # [r, V]
        token = draw_token(logits, temperature, warpers)  # [r]
        logprob = logits.gather(-1, token[:, None])[:, 0] - torch.logsumexp(logits, -1)  # [r]
        steps.append((live, token, logprob, ~done))
        done = done | torch.isin(token, eos)
        finished = int(done.sum())  # the loop's one host sync per step, as `generate`'s stopping check
        if finished == len(live) or step == max_new_tokens - 1:
            break
        if finished and finished >= compact_at * len(live):
            keep = (~done).nonzero()[:, 0]  # [r']
            cache.batch_select_indices(keep)
            mask, token, next_pos, live, done = mask[keep], token[keep], next_pos[keep], live[keep], done[keep]
            compactions += 1
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)  # [r, L + step + 1]
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
    return _collect(steps, rows, compactions)


def _collect(steps: list[tuple[Tensor, ...]], rows: int, compactions: int) -> Decoded:
    """Per-row lists from the per-step records (the tokens of rows still running at that step), one copy to
    the host."""
    token_ids: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    if steps:
        who, tok, lp, running = (torch.cat(parts).tolist() for parts in zip(*steps))
        for r, t, p, keep in zip(who, tok, lp, running):
            if keep:
                token_ids[r].append(t)
                logprobs[r].append(p)
    return Decoded(token_ids=token_ids, logprobs=logprobs, compactions=compactions)
