"""One GFT round on live objects: sample hybrid groups, reward them, group advantages, optimizer steps.

For each of the round's prompts the group holds the expert solution, teacher responses and fresh policy samples
(docs/design.md, sections 1.1-1.3); one verifier rewards every member, `group_advantages` normalizes within each
group, and `minibatches_per_round` optimizer steps of the GFT loss (`pipeline.algo.losses.gft_loss`, with Dynamic
Coefficient Rectification) each take an equal share of the round's responses. `run_round` is what the
`gft_round` stage runs between loading and saving, and what bench/gpu_bench.py times.

Two options reach past the paper's equation (its deviations are listed in `pipeline.algo.losses`):
`aggregation`, the released code's loss_agg_mode over the optimizer step (token-mean by default, the paper's), and
`score_at_temperature`, log p, C(p) and the entropy at softmax(logits / sampling.temperature) (off by default:
temperature 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from pipeline.algo.advantages import group_advantages
from pipeline.config import GFTConfig
from pipeline.data import chat
from pipeline.model.batches import Example
from pipeline.model.loop import run_steps
from pipeline.model.scoring import differentiable_entropy, gft_objective, scoring_temperature
from pipeline.model.trainer import Trainer
from pipeline.rollout.engines import Engine
from pipeline.rollout.verifiers import Verifier
from pipeline.rounds.groups import (
    Member, Phases, RoundResult, group_table, minibatch_plans, off_policy, round_order, sample_members, seed_round,
)

__all__ = ["TrainPhase", "build_groups", "reward_groups", "train_phase", "run_round", "round_metrics"]


def build_groups(engine: Engine, cfg: GFTConfig, rows: pd.DataFrame, teachers: dict[str, list[str]], tok,
                 round_idx: int) -> tuple[list[list[int]], list[list[Member]]]:
    """Prompt ids and the hybrid group of every prompt: expert, teacher and fresh policy members."""
    prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
    ids = [str(i) for i in rows["id"]]
    policy = sample_members(engine, prompt_ids, ids, cfg.policy, cfg.sampling, max_tokens=cfg.max_response_tokens,
                            round_idx=round_idx)
    groups = []
    for k, (pid, solution) in enumerate(zip(ids, rows["solution"])):
        members = off_policy(tok, pid, "expert", [solution][:cfg.expert], cfg.max_response_tokens)
        members += off_policy(tok, pid, "teacher", teachers.get(pid, [])[:cfg.teacher], cfg.max_response_tokens)
        groups.append(members + policy[k])
    return prompt_ids, groups


def reward_groups(verifier: Verifier, cfg: GFTConfig, rows: pd.DataFrame,
                  groups: list[list[Member]]) -> tuple[pd.DataFrame, dict[str, float]]:
    """Reward every member with one verifier (unscorable: 0), then group advantages: the group table and the
    advantage statistics."""
    records = rows.to_dict("records")
    flat = [(k, m) for k, members in enumerate(groups) for m in members]
    verdicts = verifier.reward([m.text for _, m in flat], [records[k] for k, _ in flat])
    rewards = torch.tensor([0.0 if r is None else r for r in verdicts.rewards], dtype=torch.float64)  # [N]
    adv = group_advantages(rewards, [m.prompt_id for _, m in flat], scale=cfg.advantage_scale,
                           baseline=cfg.advantage_baseline)
    return group_table(groups, rewards, adv.advantages), adv.stats


TrainPhase = Callable[[list[list[int]], pd.DataFrame], list[dict[str, float]]]
"""The round's optimizer steps on (prompt ids, group table) -> history: the stage's training job
(`rounds.launch.round_phase`, which runs `train_phase` in this process or in every process of a launched job), or
`train_phase` on a live trainer (bench/gpu_bench.py)."""


def train_phase(trainer: Trainer, prompt_ids: list[list[int]], table: pd.DataFrame, cfg: GFTConfig, round_idx: int,
                pad_id: int, after_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """`minibatches_per_round` optimizer steps over the round's responses, in one seeded order."""
    examples = [Example(prompt_ids[g], list(ids), float(a)) for g, ids, a in
                zip(table["group_index"], table["token_ids"], table["advantage"])]
    order = round_order(len(examples), cfg.train.seed, round_idx)
    plans = minibatch_plans(examples, order, cfg.minibatches_per_round, {"round": float(round_idx)})
    differentiable_entropy(trainer.scorer, cfg.entropy_coeff > 0)
    scoring_temperature(trainer.scorer, cfg.sampling.temperature if cfg.score_at_temperature else 1.0)
    objective = gft_objective(tau=cfg.tau, entropy_coeff=cfg.entropy_coeff, aggregation=cfg.aggregation,
                              max_response_tokens=cfg.max_response_tokens)
    return run_steps(trainer, plans, objective, cfg.train, pad_id=pad_id, after_step=after_step)


def run_round(train: TrainPhase, engine: Engine, verifier: Verifier, rows: pd.DataFrame,
              teachers: dict[str, list[str]], tok, cfg: GFTConfig, *, round_idx: int) -> RoundResult:
    """One GFT round on `rows` (the round's prompts): sample and reward groups with the engine (its model is the
    policy `train` continues), then `train`. RNGs are seeded from (train seed, round) first, so the round's bytes
    depend on its inputs only."""
    seed_round(cfg.train.seed, round_idx)
    phases = Phases()
    with phases("sample"):
        prompt_ids, groups = build_groups(engine, cfg, rows, teachers, tok, round_idx)
    with phases("reward"):
        table, stats = reward_groups(verifier, cfg, rows, groups)
    with phases("train"):
        history = train(prompt_ids, table)
    metrics = {**round_metrics(table, stats), **_perf(phases, groups, history),
               **{f"train/{k}": v for k, v in history[-1].items()}}
    return RoundResult(table=table, history=history, metrics=metrics)


def round_metrics(table: pd.DataFrame, stats: dict[str, float]) -> dict[str, float]:
    """Reward and truncation per source, zero-std group fraction, advantage and length summaries."""
    out = {f"reward/{src}": float(g["reward"].mean()) for src, g in table.groupby("source")}
    out.update({f"truncated/{src}": float(g["truncated"].sum()) for src, g in table.groupby("source")})
    out.update(frac_reward_zero_std=stats["frac_reward_zero_std"], reward_mean=float(table["reward"].mean()),
               advantage_mean=float(table["advantage"].mean()), advantage_std=float(table["advantage"].std()),
               response_length=float(table["token_ids"].map(len).mean()))
    return out


def _perf(phases: Phases, groups: Sequence[Sequence[Member]], history: list[dict[str, float]]) -> dict[str, float]:
    """Seconds per phase, sampled policy tokens per second of sampling, trained tokens per second of training,
    and the CUDA peak memory if any."""
    sampled = sum(len(m.token_ids) for group in groups for m in group if m.source == "policy")
    trained = sum(h.get("tokens", 0.0) for h in history)
    seconds = phases.seconds
    out = {**phases.metrics(), "perf/round_s": sum(seconds.values()), "perf/sample_tokens": float(sampled),
           "perf/train_tokens": float(trained), "perf/sample_tokens_per_s": sampled / max(seconds["sample"], 1e-9),
           "perf/throughput": trained / max(seconds["train"], 1e-9)}
    if torch.cuda.is_available():
        out["perf/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
