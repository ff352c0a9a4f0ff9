"""GRPO rounds (DESIGN.md section 1.7; anchors: TRL's GRPOTrainer and verl): policy-only groups, rewards,
advantages, the sampler/trainer mismatch, and the optimizer steps of one round. `stages.grpo_round` wires
these to the engine, the reward workers and the artifact store.

One round, for P prompts and G completions each:

1. Sample G completions per prompt from the current policy; the engine reports q_{k,t}, the raw
   (temperature 1) log-prob of each sampled token.
2. Score with every reward: R_k = sum_f w_f R_{k,f} over the functions that apply (None skipped); a
   completion no function applies to gets R = NaN and A = 0. A_k = (R_k - b) / (s_G + eps) per group.
3. One no-grad pass of the trainer over the rollouts gives lp_old_{k,t}, the round's starting policy. The
   gap lp_old - q is logged (sampling/*), and with correction on, every token's surrogate is weighted by
   w = min(exp(lp_old - q), C) (token) or min(exp(sum_t (lp_old - q)), C) (sequence).
4. num_iterations passes, each of minibatches_per_round optimizer steps over a seeded shuffle, of
   -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) * w + beta * k3, r = exp(lp - lp_old). The first step of
   a round uses lp.detach() as lp_old: the policy has not moved since sampling, so its ratio is exactly 1
   and its gradient is the advantage-weighted policy gradient, bit for bit.

Deviations from TRL, on purpose:
- TRL scores tokens at logits / temperature; we score at temperature 1 like the engines' log-probs (see
  GRPOConfig.sampling). With temperature 1, TRL's default, the two agree.
- Only truncation (TIS) is offered, at token or sequence level; TRL's masking modes (MIS) are not.
- `kl` is logged only when beta > 0 (no reference model is loaded otherwise), as in TRL.
- Expert and teacher tokens of GFT groups have no sampler log-probs; GFT has no ratio and applies no
  importance weight, so they are excluded from the correction by construction. GRPO groups have none.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import Tensor, nn

from pipeline.data import chat
from pipeline.algo.advantages import combine_rewards, masked_group_advantages
from pipeline.config import GRPOConfig, TrainConfig
from pipeline.rollout.engines import Engine
from pipeline.rounds.groups import Member
from pipeline.model.batches import Example, plan_step
from pipeline.algo.losses import importance_weights, sampler_mismatch
from pipeline.rollout.verifiers import Scorer
from pipeline.model.scoring import grpo_objective, score_responses
from pipeline.model.trainer import Trainer, train_step

__all__ = ["Rollouts", "sample_rollouts", "ScoredRollouts", "score_rollouts", "Behaviour", "behaviour",
           "RoundExamples", "round_examples", "train_round", "round_metrics", "reward_name"]


@dataclass(frozen=True)
class Rollouts:
    """The rendered prompt of every prompt row and its G policy completions."""

    prompt_ids: list[list[int]]
    members: list[list[Member]]


def sample_rollouts(engine: Engine, cfg: GRPOConfig, rows: pd.DataFrame, tok, round_idx: int) -> Rollouts:
    """G completions per prompt, seeded per round, cut at max_response_tokens."""
    prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
    sampling = cfg.sampling.model_copy(update={"seed": cfg.sampling.seed + 1000 * round_idx,
                                               "max_new_tokens": cfg.max_response_tokens})
    completions = engine.generate(prompt_ids, cfg.num_generations, sampling)
    members = [[Member(str(pid), "policy", c.text, list(c.token_ids), c.finish_reason == "length", list(c.logprobs))
                for c in cs] for pid, cs in zip(rows["id"], completions)]
    for pid, group in zip(rows["id"], members):
        for m in group:
            if not m.token_ids or len(m.sampler_logprobs) != len(m.token_ids):
                raise ValueError(f"prompt id={pid!r}: a completion has {len(m.token_ids)} tokens and "
                                 f"{len(m.sampler_logprobs)} sampler log-probs")
    return Rollouts(prompt_ids=prompt_ids, members=members)


def reward_name(spec: str) -> str:
    """The metric name of a reward spec: its registered name, or the function name of `module:function`."""
    return spec.rsplit(":", 1)[-1]


@dataclass(frozen=True)
class ScoredRollouts:
    """The round's group table (GFT's columns; reward NaN where no reward applies), per-reward values [N, F]
    (NaN for None) and the advantage statistics."""

    table: pd.DataFrame
    per_func: Tensor
    stats: dict[str, float]


def score_rollouts(scorers: Sequence[Scorer], cfg: GRPOConfig, rows: pd.DataFrame, rollouts: Rollouts) -> ScoredRollouts:
    """Every completion scored by every reward, combined with the weights, then group advantages."""
    records = rows.to_dict("records")
    flat = [(k, m) for k, members in enumerate(rollouts.members) for m in members]
    per_func = torch.full((len(flat), len(scorers)), float("nan"), dtype=torch.float64)  # [N, F]
    for f, scorer in enumerate(scorers):
        scored = scorer.score([m.text for _, m in flat], [records[k] for k, _ in flat])
        per_func[:, f] = torch.tensor([float("nan") if r is None else r for r in scored.rewards], dtype=torch.float64)
    combined = combine_rewards(per_func, cfg.reward_weights)
    adv = masked_group_advantages(combined.rewards, [m.prompt_id for _, m in flat], scale=cfg.advantage_scale,
                                  baseline=cfg.advantage_baseline)
    table = pd.DataFrame({
        "prompt_id": [m.prompt_id for _, m in flat], "group_index": [k for k, _ in flat],
        "source": [m.source for _, m in flat], "response": [m.text for _, m in flat],
        "token_ids": [m.token_ids for _, m in flat], "sampler_logprobs": [m.sampler_logprobs for _, m in flat],
        "reward": combined.rewards.tolist(), "advantage": adv.advantages.tolist(),
        "truncated": [m.truncated for _, m in flat],
    })
    return ScoredRollouts(table=table, per_func=per_func, stats=adv.stats)


def _padded(rows: Sequence[Sequence[float] | Tensor]) -> tuple[Tensor, Tensor]:
    """Right-padded float64 [N, T] values and their bool mask [N, T]."""
    width = max((len(r) for r in rows), default=0)
    values = torch.zeros(len(rows), width, dtype=torch.float64)  # [N, T]
    mask = torch.zeros(len(rows), width, dtype=torch.bool)  # [N, T]
    for i, r in enumerate(rows):
        values[i, :len(r)] = torch.as_tensor(r, dtype=torch.float64)
        mask[i, :len(r)] = True
    return values, mask


@dataclass(frozen=True)
class Behaviour:
    """Trainer log-probs of the round's starting policy per completion, importance weights (None when the
    correction is off) and the mismatch metrics."""

    logprobs: list[Tensor]
    is_weights: list[Tensor] | None
    metrics: dict[str, float]


def behaviour(model: nn.Module, table: pd.DataFrame, prompt_ids: list[list[int]], cfg: GRPOConfig, *,
              pad_id: int) -> Behaviour:
    """One no-grad pass of the trainer over the rollouts: lp_old, its gap to the sampler, the IS weights."""
    prompts = [prompt_ids[g] for g in table["group_index"]]
    scores = score_responses(model, prompts, list(table["token_ids"]), pad_id=pad_id)
    lp, mask = _padded(scores.logprobs)  # [N, T]
    q, _ = _padded(list(table["sampler_logprobs"]))  # [N, T]
    isw = importance_weights(lp, q, mask, level=cfg.importance_sampling, cap=cfg.importance_sampling_cap)
    metrics = {k: float(v) for k, v in {**sampler_mismatch(lp, q, mask), **isw.metrics}.items()}
    lengths = [len(x) for x in scores.logprobs]
    weights = None if cfg.importance_sampling == "none" else [isw.weights[i, :n] for i, n in enumerate(lengths)]
    return Behaviour(logprobs=scores.logprobs, is_weights=weights, metrics=metrics)


@dataclass(frozen=True)
class RoundExamples:
    """`fresh`: examples without old log-probs (the round's first step, ratio exactly 1); `stale`: the same
    examples with lp_old for every later step."""

    fresh: list[Example]
    stale: list[Example]


def round_examples(table: pd.DataFrame, prompt_ids: list[list[int]], behave: Behaviour,
                   ref_logprobs: list[Tensor] | None) -> RoundExamples:
    fresh = []
    for i, (g, ids, adv) in enumerate(zip(table["group_index"], table["token_ids"], table["advantage"])):
        fresh.append(Example(prompt_ids[g], list(ids), float(adv),
                             ref_logprobs=None if ref_logprobs is None else ref_logprobs[i].tolist(),
                             is_weights=None if behave.is_weights is None else behave.is_weights[i].tolist()))
    stale = [replace(ex, old_logprobs=lp.tolist()) for ex, lp in zip(fresh, behave.logprobs)]
    return RoundExamples(fresh=fresh, stale=stale)


def train_round(trainer: Trainer, examples: RoundExamples, cfg: GRPOConfig, train_cfg: TrainConfig,
                round_idx: int, *, pad_id: int) -> list[dict[str, float]]:
    """num_iterations x minibatches_per_round optimizer steps; one history row per step."""
    objective = grpo_objective(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                               aggregation=cfg.aggregation, max_response_tokens=cfg.max_response_tokens)
    acc, m, history = trainer.accelerator, cfg.minibatches_per_round, []
    for it in range(cfg.num_iterations):
        order = list(range(len(examples.fresh)))
        random.Random(cfg.train.seed * 104729 + round_idx * 1009 + it).shuffle(order)
        for j in range(m):
            data = examples.fresh if it == 0 and j == 0 else examples.stale
            step = trainer.progress.step
            micro, totals = plan_step(data, order[j::m], train_cfg, rank=acc.process_index,
                                      world=acc.num_processes, pad_id=pad_id)
            result = train_step(trainer, micro, objective, totals, max_grad_norm=train_cfg.max_grad_norm, step=step)
            trainer.progress.step = step + 1
            history.append({"step": float(step + 1), "round": float(round_idx), "iteration": float(it),
                            "minibatch": float(j), **result.metrics})
    return history


def _reward_stats(table: pd.DataFrame, per_func: Tensor, names: Sequence[str]) -> dict[str, float]:
    """TRL's reward (mean), reward_std (mean over groups of the group's std) and rewards/<fn>/{mean,std}."""
    scored = table[table["reward"].notna()]
    group_std = scored.groupby("prompt_id")["reward"].std().fillna(0.0)  # Bessel, like TRL
    out = {"reward": float(scored["reward"].mean()) if len(scored) else float("nan"),
           "reward_std": float(group_std.mean()) if len(group_std) else 0.0}
    for f, name in enumerate(names):
        col = per_func[:, f][~torch.isnan(per_func[:, f])]
        out[f"rewards/{name}/mean"] = float(col.mean()) if col.numel() else float("nan")
        out[f"rewards/{name}/std"] = float(col.std()) if col.numel() > 1 else 0.0
    return out


def _completion_stats(table: pd.DataFrame) -> dict[str, float]:
    lengths = table["token_ids"].map(len)
    done = lengths[~table["truncated"]]
    return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/mean_terminated_length": float(done.mean()) if len(done) else 0.0,
            "completions/clipped_ratio": float(table["truncated"].mean())}


_STEP_MEANS = ("loss", "grad_norm", "entropy", "kl", "ratio_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean")


def round_metrics(scored: ScoredRollouts, behave: Behaviour, history: list[dict[str, float]], names: Sequence[str],
                  times: dict[str, float], prompt_tokens: int) -> dict[str, float]:
    """The round's metrics under TRL/verl names; policy metrics are means over the round's optimizer steps."""
    table = scored.table
    out = {**_reward_stats(table, scored.per_func, names), **_completion_stats(table), **behave.metrics, **times}
    out.update(frac_reward_zero_std=scored.stats["frac_reward_zero_std"],
               frac_reward_missing=scored.stats["frac_reward_missing"],
               advantage_mean=float(table["advantage"].mean()), advantage_std=float(table["advantage"].std()))
    for key in _STEP_MEANS:
        if history and key in history[0]:
            out[key] = sum(h[key] for h in history) / len(history)
    tokens = prompt_tokens + int(table["token_ids"].map(len).sum())
    wall = times.get("perf/sample_s", 0.0) + times.get("perf/score_s", 0.0) + times.get("perf/train_s", 0.0)
    out["perf/throughput"] = tokens / wall if wall > 0 else 0.0
    out.update({f"train/{k}": v for k, v in history[-1].items()} if history else {})
    return out
