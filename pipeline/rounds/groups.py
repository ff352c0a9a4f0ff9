"""Hybrid groups : expert, teacher and fresh policy members of every prompt,
scored by one verifier, with group advantages; the table a GFT round writes as groups.parquet."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from pipeline.data import chat
from pipeline.algo.advantages import group_advantages
from pipeline.config import GFTConfig
from pipeline.rollout.engines import Engine
from pipeline.rollout.verifiers import Scorer

__all__ = ["Member", "ScoredGroups", "off_policy", "round_prompts", "build_groups", "score_groups", "round_metrics"]


@dataclass(frozen=True)
class Member:
    """One response of a group: where it came from and its tokens (sampler log-probs for policy samples)."""

    prompt_id: str
    source: str  # expert | teacher | policy
    text: str
    token_ids: list[int]
    truncated: bool
    sampler_logprobs: list[float] | None = None


def off_policy(tok, prompt_id: str, source: str, texts: Sequence[str], max_tokens: int) -> list[Member]:
    """Expert or teacher text tokenized exactly as a generated response: text + EOS, cut at max_tokens."""
    out = []
    for text in texts:
        rendered = chat.render_response(tok, text, max_tokens=max_tokens)
        out.append(Member(prompt_id, source, text, list(rendered.ids), rendered.truncated))
    return out


def round_prompts(rows: pd.DataFrame, cfg: GFTConfig, round_idx: int, seed: int) -> pd.DataFrame:
    """The round's prompts: consecutive slices of one seeded shuffle per pass over the training prompts."""
    picked = []
    for pos in range(round_idx * cfg.prompts_per_round, (round_idx + 1) * cfg.prompts_per_round):
        epoch, offset = divmod(pos, len(rows))
        order = list(range(len(rows)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        picked.append(order[offset])
    return rows.iloc[picked].reset_index(drop=True)


def _policy_members(engine: Engine, prompt_ids: list[list[int]], ids: Sequence[str], cfg: GFTConfig,
                    round_idx: int) -> list[list[Member]]:
    if cfg.policy == 0:
        return [[] for _ in ids]
    sampling = cfg.sampling.model_copy(update={"seed": cfg.sampling.seed + 1000 * round_idx,
                                               "max_new_tokens": cfg.max_response_tokens})
    completions = engine.generate(prompt_ids, cfg.policy, sampling)
    return [[Member(str(pid), "policy", c.text, list(c.token_ids), c.finish_reason == "length", list(c.logprobs))
             for c in cs] for pid, cs in zip(ids, completions)]


def build_groups(engine: Engine, cfg: GFTConfig, rows: pd.DataFrame, teachers: dict[str, list[str]], tok,
                 round_idx: int) -> tuple[list[list[int]], list[list[Member]]]:
    """Prompt ids and the hybrid group of every prompt: expert, teacher and fresh policy members."""
    prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
    ids = [str(i) for i in rows["id"]]
    policy = _policy_members(engine, prompt_ids, ids, cfg, round_idx)
    groups = []
    for k, (pid, solution) in enumerate(zip(ids, rows["solution"])):
        members = off_policy(tok, pid, "expert", [solution][:cfg.expert], cfg.max_response_tokens)
        members += off_policy(tok, pid, "teacher", teachers.get(pid, [])[:cfg.teacher], cfg.max_response_tokens)
        groups.append(members + policy[k])
    return prompt_ids, groups


@dataclass(frozen=True)
class ScoredGroups:
    """The round's group table (one row per member) and the advantage statistics of the batch."""

    table: pd.DataFrame
    stats: dict[str, float]


def score_groups(scorer: Scorer, cfg: GFTConfig, rows: pd.DataFrame, groups: list[list[Member]]) -> ScoredGroups:
    """Reward every member with one verifier, then group advantages: the round's group table."""
    records = rows.to_dict("records")
    flat = [(k, m) for k, members in enumerate(groups) for m in members]
    scored = scorer.score([m.text for _, m in flat], [records[k] for k, _ in flat])
    rewards = [0.0 if r is None else r for r in scored.rewards]
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), [m.prompt_id for _, m in flat],
                           scale=cfg.advantage_scale, baseline=cfg.advantage_baseline)
    table = pd.DataFrame({
        "prompt_id": [m.prompt_id for _, m in flat], "group_index": [k for k, _ in flat],
        "source": [m.source for _, m in flat], "response": [m.text for _, m in flat],
        "token_ids": [m.token_ids for _, m in flat], "sampler_logprobs": [m.sampler_logprobs for _, m in flat],
        "reward": rewards, "advantage": adv.advantages.tolist(), "truncated": [m.truncated for _, m in flat],
    })
    return ScoredGroups(table=table, stats=adv.stats)


def round_metrics(scored: ScoredGroups) -> dict[str, float]:
    """Reward and truncation per source, zero-std group fraction, advantage and length summaries."""
    table = scored.table
    out = {f"reward/{src}": float(g["reward"].mean()) for src, g in table.groupby("source")}
    out.update({f"truncated/{src}": float(g["truncated"].sum()) for src, g in table.groupby("source")})
    out.update(frac_reward_zero_std=scored.stats["frac_reward_zero_std"], reward_mean=float(table["reward"].mean()),
               advantage_mean=float(table["advantage"].mean()), advantage_std=float(table["advantage"].std()),
               response_length=float(table["token_ids"].map(len).mean()))
    return out
