"""What GFT and GRPO rounds share: members of a group, the one sampling rule, the one group table, the one
seed rule, and the round's step plans.

A round draws `prompts_per_round` prompts (consecutive slices of one seeded shuffle per pass over the training
prompts), samples policy members with the engine (seeded per round, cut at the response budget), rewards every
member, and writes one row per member to groups.parquet with the columns of `GROUP_COLUMNS`. Every seeded
choice of a round (which prompts, the sampler's seed, the order of the optimizer steps) is `derive_seed(seed,
what, round, ...)`: one rule, so no two choices share a stream by accident.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
from accelerate.utils import set_seed
from torch import Tensor

from pipeline.config import SamplingConfig
from pipeline.data import chat
from pipeline.model.batches import Example
from pipeline.model.loop import StepPlan
from pipeline.rollout.engines import Engine

__all__ = ["Member", "GROUP_COLUMNS", "derive_seed", "seed_round", "round_prompts", "sample_members", "off_policy",
           "group_table", "round_order", "minibatch_plans", "Phases", "RoundResult"]

GROUP_COLUMNS = ("prompt_id", "group_index", "source", "response", "token_ids", "sampler_logprobs", "reward",
                 "advantage", "truncated")
"""groups.parquet, one row per member: prompt id, index of its group in the round, source (expert | teacher |
policy), response text, its token ids, the sampler's log-probs (policy members; None otherwise), reward (NaN where
no reward applies), advantage, and whether the response budget cut it."""


@dataclass(frozen=True)
class Member:
    """One response of a group: where it came from and its tokens (sampler log-probs for policy samples)."""

    prompt_id: str
    source: str  # expert | teacher | policy
    text: str
    token_ids: list[int]
    truncated: bool
    sampler_logprobs: list[float] | None = None


def derive_seed(seed: int, what: str, *path: int) -> int:
    """The seed of one choice of a round: sha256 of (seed, what, path) cut to 31 bits (fits every sampler)."""
    blob = ":".join([str(seed), what, *map(str, path)]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") % 2**31


def seed_round(seed: int, round_idx: int) -> None:
    """Seed every RNG of the process (python, numpy, torch) as round `round_idx` of a run seeded `seed` seeds
    them: before a round samples and again before its optimizer steps, so neither depends on what ran before."""
    set_seed(derive_seed(seed, "round", round_idx))


def round_prompts(rows: pd.DataFrame, per_round: int, round_idx: int, seed: int) -> pd.DataFrame:
    """The round's prompts: consecutive slices of one seeded shuffle per pass over the training prompts."""
    picked = []
    for pos in range(round_idx * per_round, (round_idx + 1) * per_round):
        epoch, offset = divmod(pos, len(rows))
        order = list(range(len(rows)))
        random.Random(derive_seed(seed, "prompts", epoch)).shuffle(order)
        picked.append(order[offset])
    return rows.iloc[picked].reset_index(drop=True)


def sample_members(engine: Engine, prompt_ids: list[list[int]], ids: Sequence[str], n: int,
                   sampling: SamplingConfig, *, max_tokens: int, round_idx: int) -> list[list[Member]]:
    """`n` policy members per prompt from the engine, seeded per round, stopped at `max_tokens`; every member
    has one sampler log-prob per token."""
    if n == 0:
        return [[] for _ in ids]
    sampling = sampling.model_copy(update={"seed": derive_seed(sampling.seed, "sample", round_idx),
                                           "max_new_tokens": max_tokens})
    completions = engine.generate(prompt_ids, n, sampling)
    members = [[Member(str(pid), "policy", c.text, list(c.token_ids), c.finish_reason == "length", list(c.logprobs))
                for c in cs] for pid, cs in zip(ids, completions)]
    for group in members:
        for m in group:
            if not m.token_ids or len(m.sampler_logprobs) != len(m.token_ids):
                raise ValueError(f"prompt id={m.prompt_id!r}: a completion has {len(m.token_ids)} tokens and "
                                 f"{len(m.sampler_logprobs)} sampler log-probs")
    return members


def off_policy(tok, prompt_id: str, source: str, texts: Sequence[str], max_tokens: int) -> list[Member]:
    """Expert or teacher text tokenized exactly as a generated response: text + EOS, cut at max_tokens."""
    out = []
    for text in texts:
        rendered = chat.render_response(tok, text, max_tokens=max_tokens)
        out.append(Member(prompt_id, source, text, list(rendered.ids), rendered.truncated))
    return out


def group_table(groups: Sequence[Sequence[Member]], rewards: Tensor, advantages: Tensor) -> pd.DataFrame:
    """The round's groups.parquet: one row per member (groups flattened in order), `GROUP_COLUMNS`."""
    flat = [(k, m) for k, members in enumerate(groups) for m in members]
    return pd.DataFrame({
        "prompt_id": [m.prompt_id for _, m in flat], "group_index": [k for k, _ in flat],
        "source": [m.source for _, m in flat], "response": [m.text for _, m in flat],
        "token_ids": [m.token_ids for _, m in flat], "sampler_logprobs": [m.sampler_logprobs for _, m in flat],
        "reward": rewards.tolist(), "advantage": advantages.tolist(), "truncated": [m.truncated for _, m in flat],
    }, columns=list(GROUP_COLUMNS))


def round_order(n: int, seed: int, round_idx: int, iteration: int = 0) -> list[int]:
    """The seeded order of a round's n training examples (one per pass over them)."""
    order = list(range(n))
    random.Random(derive_seed(seed, "order", round_idx, iteration)).shuffle(order)
    return order


def minibatch_plans(examples: Sequence[Example], order: Sequence[int], minibatches: int,
                    tags: dict[str, float]) -> list[StepPlan]:
    """One optimizer step per minibatch: the j-th takes every `minibatches`-th example of `order` from j."""
    return [StepPlan(examples, order[j::minibatches], {**tags, "minibatch": float(j)}) for j in range(minibatches)]


class Phases:
    """Wall seconds per phase of a round (sample, reward, train): `with phases("sample"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"perf/{name}_s": s for name, s in self.seconds.items()}


@dataclass(frozen=True)
class RoundResult:
    """What a round produced: its group table (groups.parquet), one history row per optimizer step, metrics."""

    table: pd.DataFrame
    history: list[dict[str, float]]
    metrics: dict[str, float]
