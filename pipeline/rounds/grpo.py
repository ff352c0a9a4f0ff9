"""One GRPO round on live objects (docs/design.md section 1.7; anchors: TRL's GRPOTrainer and verl):
policy-only groups, rewards, advantages, the sampler/trainer mismatch, and the round's optimizer steps.
`run_round` is what the `grpo_round` stage runs between loading and saving; its training (steps 3 and 4,
`train_phase`) is the round's training job (`pipeline.rounds.job`), in the stage's process or in every process of
a launched one.

One round, for P prompts and G completions each:

1. Sample G completions per prompt from the current policy; the engine reports q_{k,t}, the raw
   (temperature 1) log-prob of each sampled token. With score_at_temperature every trainer log-prob below
   (new, old, reference) and the entropy are at softmax(logits / T), T = sampling.temperature.
2. Score with every reward: R_k = sum_f w_f R_{k,f} over the functions that apply (None skipped); a
   completion no function applies to gets R = NaN and A = 0. A_k = (R_k - b) / (s + eps) per group, s the
   group's or the batch's std (TRL's scale_rewards); a group with one scored completion gives it A = 0 (TRL)
   unless singleton_advantage = "reward". With multi_objective_aggregation = "normalize_then_sum" each reward
   is normalized in its group before the weighted sum, which is then normalized over the batch.
3. One no-grad pass of the trainer over the rollouts gives lp_old_{k,t}, the round's starting policy. The
   gap lp_old - q is logged (sampling/*), and with a sampler correction every token's surrogate is weighted
   by rho = exp(lp_old - q) per token or exp(sum_t (lp_old - q)) per sequence, truncated to [min, max] or
   masked (0) outside it (TRL's vllm_importance_sampling_mode). q is raw, so when lp_old is tempered
   (score_at_temperature, T != 1) a second no-grad pass at temperature 1 gives the lp that q is compared with.
4. num_iterations passes, each of minibatches_per_round optimizer steps over a seeded shuffle, of
   `grpo_loss`: the clipped surrogate (optionally dual-clipped, at the token or GSPO's sequence ratio) * w
   + beta * KL - entropy_coeff * H. The first step of a round uses lp.detach() as lp_old: the policy has not
   moved since sampling, so its ratio is exactly 1 and its gradient is the advantage-weighted policy
   gradient, bit for bit.

Deviations from TRL, on purpose:
- TRL scores tokens at logits / temperature; we score at temperature 1 like the engines' log-probs unless
  score_at_temperature is set. With temperature 1, TRL's default, the two agree. With it set, the sampler
  comparison stays raw against raw (step 3); TRL compares vLLM's processed (tempered, top-p) log-probs.
- The default sampler correction is token_truncate, not TRL's sequence_mask (GRPOConfig.sampler_correction).
- advantage_eps defaults to verl's 1e-6, not TRL's 1e-4.
- `kl` is logged only when beta > 0 (no reference model is loaded otherwise), as in TRL.
- Expert and teacher tokens of GFT groups have no sampler log-probs; GFT has no ratio and applies no
  importance weight, so they are excluded from the correction by construction. GRPO groups have none.

Why GRPOConfig's defaults and options are what they are (the settings only say what each one is):
- eps_high 0.28 is DAPO's clip-higher, against TRL's symmetric epsilon 0.2: low-probability tokens can gain mass,
  which slows entropy collapse. It only matters when the ratio can leave 1 (num_iterations > 1 or
  minibatches_per_round > 1; steps after a round's first are off-policy).
- sampler_correction token_truncate (verl's token-level rollout IS) keeps every sequence's gradient; TRL's
  sequence_mask drops a whole sequence whose rho leaves [min, max]. The correction is not GSPO's sequence ratio
  (importance_sampling_level), which is the ratio the surrogate clips.
- Keep sampling.temperature at 1, or set score_at_temperature: the trainer otherwise scores at temperature 1 like
  the engines' log-probs, and optimises the untempered policy on tempered samples. score_at_temperature is off
  by default so that existing runs keep their outputs.
- max_response_tokens defaults to 128 (TRL's max_completion_length: 512) to fit the tiny task; the cut
  completions are `truncated` and counted in completions/clipped_ratio.
- prompt_pool lets rounds revisit the same prompts, like TRL's epochs over a small dataset, so the reward curve
  measures learning rather than which prompts each round drew.
- dual_clip is verl's clip_ratio_c (3 in verl) and TRL's delta, the same loss when c > 1 + eps_high; off by
  default as in TRL. beta 0 and no kl_clamp are TRL's defaults (verl's low_var_kl clamps at 10).
- Old option names (importance_sampling, the aggregation values token_mean, sequence_mean, constant) fail with
  their new names (`pipeline.config.renames`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import Tensor, nn

from pipeline.algo.advantages import combine_rewards, masked_group_advantages, normalize_then_sum
from pipeline.algo.sampler import importance_weights, sampler_mismatch
from pipeline.config import GRPOConfig
from pipeline.data import chat
from pipeline.model.batches import Example
from pipeline.model.loop import run_steps
from pipeline.model.scoring import (
    GRPOLossOptions, differentiable_entropy, grpo_objective, score_responses, scorer_at, scoring_temperature,
)
from pipeline.model.trainer import Trainer
from pipeline.rollout.engines import Engine
from pipeline.rollout.verifiers import Verifier
from pipeline.rounds.groups import (
    Member, Phases, RoundResult, group_table, minibatch_plans, round_order, sample_members, seed_round,
)

__all__ = ["Rollouts", "sample_rollouts", "RewardedRollouts", "reward_rollouts", "Behaviour", "behaviour",
           "RoundExamples", "round_examples", "train_round", "loss_options", "score_temperature", "Trained",
           "TrainPhase", "train_phase",
           "run_round", "round_metrics", "reward_name"]


@dataclass(frozen=True)
class Rollouts:
    """The rendered prompt of every prompt row and its G policy completions."""

    prompt_ids: list[list[int]]
    members: list[list[Member]]


def sample_rollouts(engine: Engine, cfg: GRPOConfig, rows: pd.DataFrame, tok, round_idx: int) -> Rollouts:
    """G completions per prompt, by the rounds' one sampling rule (`groups.sample_members`)."""
    prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
    members = sample_members(engine, prompt_ids, [str(i) for i in rows["id"]], cfg.num_generations, cfg.sampling,
                             max_tokens=cfg.max_response_tokens, round_idx=round_idx)
    return Rollouts(prompt_ids=prompt_ids, members=members)


def reward_name(spec: str) -> str:
    """The metric name of a reward spec: its registered name, or the function name of `module:function`."""
    return spec.rsplit(":", 1)[-1]


@dataclass(frozen=True)
class RewardedRollouts:
    """The round's group table (`groups.GROUP_COLUMNS`; reward NaN where no reward applies), per-reward values
    [N, F] (NaN for None) and the advantage statistics."""

    table: pd.DataFrame
    per_func: Tensor
    stats: dict[str, float]


def reward_rollouts(verifiers: Sequence[Verifier], cfg: GRPOConfig, rows: pd.DataFrame,
                    rollouts: Rollouts) -> RewardedRollouts:
    """Every completion rewarded by every verifier, combined with the weights, then group advantages."""
    records = rows.to_dict("records")
    flat = [(k, m) for k, members in enumerate(rollouts.members) for m in members]
    per_func = torch.full((len(flat), len(verifiers)), float("nan"), dtype=torch.float64)  # [N, F]
    for f, verifier in enumerate(verifiers):
        out = verifier.reward([m.text for _, m in flat], [records[k] for k, _ in flat])
        per_func[:, f] = torch.tensor([float("nan") if r is None else r for r in out.rewards], dtype=torch.float64)
    combined = combine_rewards(per_func, cfg.reward_weights)
    ids = [m.prompt_id for _, m in flat]
    adv = masked_group_advantages(combined.rewards, ids, scale=cfg.advantage_scale, baseline=cfg.advantage_baseline,
                                  eps=cfg.advantage_eps, singleton=cfg.singleton_advantage)
    advantages = adv.advantages  # [N]
    if cfg.multi_objective_aggregation == "normalize_then_sum":  # the group stats above stay for logging
        advantages = normalize_then_sum(per_func, ids, cfg.reward_weights, eps=cfg.advantage_eps).advantages
    table = group_table(rollouts.members, combined.rewards, advantages)
    return RewardedRollouts(table=table, per_func=per_func, stats=adv.stats)


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


def score_temperature(cfg: GRPOConfig) -> float:
    """The temperature the trainer scores at: the sampling temperature with score_at_temperature, else 1."""
    return cfg.sampling.temperature if cfg.score_at_temperature else 1.0


def _score_at(model: nn.Module, prompts: list[list[int]], responses: list[list[int]], temperature: float, *,
              pad_id: int) -> list[Tensor]:
    """Per response, its tokens' log-probs [T_k] under `model` at `temperature`, scored as a freshly loaded
    model is (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with scorer_at(model, temperature) as scorer:
            return score_responses(scorer, prompts, responses, pad_id=pad_id).logprobs
    finally:
        model.train(was_training)


def behaviour(model: nn.Module, table: pd.DataFrame, prompt_ids: list[list[int]], cfg: GRPOConfig, *,
              pad_id: int) -> Behaviour:
    """One no-grad pass of the trainer over the rollouts: lp_old, its gap to the sampler, the IS weights. The
    engines' q is raw (temperature 1): lp_old at another temperature is compared through one more pass at 1."""
    prompts, responses = [prompt_ids[g] for g in table["group_index"]], list(table["token_ids"])
    temperature = score_temperature(cfg)
    old = _score_at(model, prompts, responses, temperature, pad_id=pad_id)
    raw = old if temperature == 1.0 else _score_at(model, prompts, responses, 1.0, pad_id=pad_id)
    lp, mask = _padded(raw)  # [N, T]
    q, _ = _padded(list(table["sampler_logprobs"]))  # [N, T]
    isw = importance_weights(lp, q, mask, mode=cfg.sampler_correction, cap=cfg.sampler_correction_max,
                             floor=cfg.sampler_correction_min)
    metrics = {k: float(v) for k, v in {**sampler_mismatch(lp, q, mask), **isw.metrics}.items()}
    lengths = [len(x) for x in old]
    weights = None if cfg.sampler_correction == "none" else [isw.weights[i, :n] for i, n in enumerate(lengths)]
    return Behaviour(logprobs=old, is_weights=weights, metrics=metrics)


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


def train_round(trainer: Trainer, examples: RoundExamples, cfg: GRPOConfig, round_idx: int, *, pad_id: int,
                after_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """num_iterations x minibatches_per_round optimizer steps; one history row per step. The round's first step
    takes the fresh examples (ratio exactly 1), every later one the stale (lp_old) ones."""
    objective = grpo_objective(loss_options(cfg), max_response_tokens=cfg.max_response_tokens)
    differentiable_entropy(trainer.scorer, cfg.entropy_coeff > 0)
    scoring_temperature(trainer.scorer, score_temperature(cfg))
    plans = []
    for it in range(cfg.num_iterations):
        order = round_order(len(examples.fresh), cfg.train.seed, round_idx, it)
        tags = {"round": float(round_idx), "iteration": float(it)}
        plans += minibatch_plans(examples.stale, order, cfg.minibatches_per_round, tags)
    plans[0] = replace(plans[0], examples=examples.fresh)
    return run_steps(trainer, plans, objective, cfg.train, pad_id=pad_id, after_step=after_step)


def loss_options(cfg: GRPOConfig) -> GRPOLossOptions:
    """The settings `grpo_loss` takes, read off the config."""
    return GRPOLossOptions(eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
                           ratio_level=cfg.importance_sampling_level, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                           kl_clamp=cfg.kl_clamp, entropy_coeff=cfg.entropy_coeff, aggregation=cfg.aggregation)


@dataclass(frozen=True)
class Trained:
    """What a round's train phase reports: the behaviour pass's metrics (sampler mismatch, importance weights)
    and one history row per optimizer step."""

    behaviour: dict[str, float]
    history: list[dict[str, float]]


TrainPhase = Callable[[list[list[int]], pd.DataFrame], Trained]
"""The round's training on (prompt ids, rewarded group table): the stage's training job (`rounds.launch.round_phase`,
which runs `train_phase` in this process or in every process of a launched job), or `train_phase` on a live
trainer."""


def train_phase(trainer: Trainer, prompt_ids: list[list[int]], table: pd.DataFrame, cfg: GRPOConfig, round_idx: int,
                pad_id: int, reference: nn.Module | None = None,
                after_step: Callable[[dict[str, float]], None] | None = None) -> Trained:
    """lp_old from the trainer's starting policy, the reference's log-probs when given (beta > 0), then the
    round's optimizer steps. Under FSDP2 every process scores every rollout through the sharded scorer."""
    behave = behaviour(trainer.scorer if trainer.sharded else trainer.model, table, prompt_ids, cfg, pad_id=pad_id)
    ref = None if reference is None else _score_at(reference, [prompt_ids[g] for g in table["group_index"]],
                                                   list(table["token_ids"]), score_temperature(cfg), pad_id=pad_id)
    history = train_round(trainer, round_examples(table, prompt_ids, behave, ref), cfg, round_idx, pad_id=pad_id,
                          after_step=after_step)
    return Trained(behaviour=behave.metrics, history=history)


def run_round(train: TrainPhase, engine: Engine, verifiers: Sequence[Verifier], rows: pd.DataFrame, tok,
              cfg: GRPOConfig, *, round_idx: int) -> RoundResult:
    """One GRPO round on `rows` (the round's prompts): sample with the engine (its model is the policy `train`
    continues), reward, then `train`. RNGs are seeded from (train seed, round) first."""
    seed_round(cfg.train.seed, round_idx)
    phases = Phases()
    with phases("sample"):
        rollouts = sample_rollouts(engine, cfg, rows, tok, round_idx)
    with phases("reward"):
        rewarded = reward_rollouts(verifiers, cfg, rows, rollouts)
    with phases("train"):
        trained = train(rollouts.prompt_ids, rewarded.table)
    prompt_tokens = sum(len(p) for p in rollouts.prompt_ids) * cfg.num_generations
    names = [reward_name(r) for r in cfg.rewards]
    metrics = round_metrics(rewarded, trained, names, phases.metrics(), prompt_tokens)
    return RoundResult(table=rewarded.table, history=trained.history, metrics=metrics)


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
               "clip_ratio/region_mean", "pg_clipfrac_lower")


def round_metrics(scored: RewardedRollouts, trained: Trained, names: Sequence[str], times: dict[str, float],
                  prompt_tokens: int) -> dict[str, float]:
    """The round's metrics under TRL/verl names; policy metrics are means over the round's optimizer steps."""
    table, history = scored.table, trained.history
    out = {**_reward_stats(table, scored.per_func, names), **_completion_stats(table), **trained.behaviour, **times}
    out.update(frac_reward_zero_std=scored.stats["frac_reward_zero_std"],
               frac_reward_missing=scored.stats["frac_reward_missing"],
               advantage_mean=float(table["advantage"].mean()), advantage_std=float(table["advantage"].std()))
    for key in _STEP_MEANS:
        if history and key in history[0]:
            out[key] = sum(h[key] for h in history) / len(history)
    tokens = prompt_tokens + int(table["token_ids"].map(len).sum())
    wall = times.get("perf/sample_s", 0.0) + times.get("perf/reward_s", 0.0) + times.get("perf/train_s", 0.0)
    out["perf/throughput"] = tokens / wall if wall > 0 else 0.0
    out.update({f"train/{k}": v for k, v in history[-1].items()} if history else {})
    return out
