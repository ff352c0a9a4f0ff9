"""Evaluation of one checkpoint on held-out prompts: sample, grade every sample with the verifier, and score the
policy's entropy on its own samples and KL(base || policy) on the base's (docs/design.md section 1.9).

The metrics themselves (mean@k, pass@k, greedy accuracy, KL) are pure functions in `pipeline.algo.metrics`;
`evaluate` is what the `evaluate` stage runs between loading and saving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from pipeline.algo.metrics import EvalSamples, accuracy_metrics, kl_per_token
from pipeline.config import EvalConfig
from pipeline.data import chat
from pipeline.model.loading import load_model
from pipeline.model.scoring import score_responses
from pipeline.rollout.engines import Engine
from pipeline.rollout.verifiers import Verifier, last_boxed

__all__ = ["grade_prompt", "Split", "Models", "Graded", "grade", "Evaluation", "evaluate", "samples_table"]


def grade_prompt(verifier: Verifier, row: Mapping, sampled: Sequence[str], greedy: str) -> EvalSamples:
    """Score k samples and one greedy completion of one prompt (None rewards count as 0)."""
    out = verifier.reward(list(sampled) + [greedy], [row] * (len(sampled) + 1))
    rewards = [r or 0.0 for r in out.rewards]
    return EvalSamples(rewards=rewards[:-1], answers=[last_boxed(t) for t in sampled], greedy_reward=rewards[-1])


@dataclass(frozen=True)
class Split:
    """The prompt rows of one split, and where they were read (for errors)."""

    rows: pd.DataFrame
    where: str


@dataclass(frozen=True)
class Models:
    """The evaluated checkpoint's and the base's model folders; `same` when they are one checkpoint."""

    policy: str
    base: str
    same: bool
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Graded:
    rows: pd.DataFrame
    prompt_ids: list[list[int]]
    sampled: list
    greedy: list
    per_prompt: list[EvalSamples]


def grade(cfg: EvalConfig, sampler: Engine, verifier: Verifier, tok, split: Split) -> Graded:
    """Sample k responses and a greedy one for (at most `cfg.max_prompts` of) the split's rows, and grade them."""
    if split.rows.empty:
        raise ValueError(f"evaluate: no prompts to grade: {split.where} has no rows")
    rows = split.rows.iloc[: cfg.max_prompts] if cfg.max_prompts else split.rows
    prompt_ids = [chat.render_prompt(tok, p) for p in rows["prompt"]]
    sampled = sampler.generate(prompt_ids, cfg.k, cfg.sampling)
    greedy = sampler.generate(prompt_ids, 1, cfg.sampling.model_copy(update={"temperature": 0.0}))
    per_prompt = [grade_prompt(verifier, rec, [c.text for c in cs], g[0].text)
                  for rec, cs, g in zip(rows.to_dict("records"), sampled, greedy)]
    return Graded(rows, prompt_ids, sampled, greedy, per_prompt)


@dataclass(frozen=True)
class Evaluation:
    """The metrics, the test split's samples table (samples.parquet) and how many engine.generate calls ran."""

    metrics: dict[str, float]
    samples: pd.DataFrame
    generate_calls: int


def evaluate(cfg: EvalConfig, models: Models, sampler: Engine, base_sampler: Callable[[], Engine],
             verifier: Verifier, tok, test: Split, validation: Split | None = None) -> Evaluation:
    """Held-out mean@k, pass@k, greedy accuracy, entropy and KL(base || policy) on `test`; with `validation`,
    also `val/mean@k`, `val/pass@k` and `val/greedy_accuracy` on it. `base_sampler()` builds the base's engine
    only when the KL needs base samples."""
    graded = grade(cfg, sampler, verifier, tok, test)
    metrics = accuracy_metrics(graded.per_prompt, k=cfg.k)
    kl, base_calls = _entropy_and_kl(cfg, models, base_sampler, graded, chat.pad_id(tok))
    metrics.update(kl)
    if validation is not None:
        val = grade(cfg, sampler, verifier, tok, validation)
        metrics.update({f"val/{name}": v for name, v in accuracy_metrics(val.per_prompt, k=cfg.k).items()})
    calls = 2 * (1 + (validation is not None)) + base_calls
    return Evaluation(metrics, samples_table(graded), calls)


def _entropy_and_kl(cfg: EvalConfig, models: Models, base_sampler: Callable[[], Engine], graded: Graded,
                    pad: int) -> tuple[dict[str, float], int]:
    """The policy's token entropy on its own samples, KL(base || policy) per token on the base's samples, and
    the engine calls that took (0 or 1). One scoring model is loaded at a time: the base's samples are drawn
    first (the engine seeds its own sampling), the policy scores its samples and the base's, then goes before
    the base is loaded to score those."""
    remote, kl = models.trust_remote_code, cfg.kl_samples > 0 and not models.same
    base_samples = base_sampler().generate(graded.prompt_ids, cfg.kl_samples,
                                           cfg.sampling.model_copy(update={"temperature": 1.0})) if kl else []
    bp = [p for p, cs in zip(graded.prompt_ids, base_samples) for _ in cs]
    br = [list(c.token_ids) for cs in base_samples for c in cs]
    policy = load_model(models.policy, trust_remote_code=remote)
    flat_p = [p for p, cs in zip(graded.prompt_ids, graded.sampled) for _ in cs]
    own = score_responses(policy, flat_p, [list(c.token_ids) for cs in graded.sampled for c in cs], pad_id=pad)
    tokens = sum(e.numel() for e in own.entropy)
    out = {"entropy": sum(float(e.sum()) for e in own.entropy) / max(tokens, 1)}
    if cfg.kl_samples == 0:
        return out, 0
    if models.same:
        return {**out, "kl_base_policy": 0.0}, 0  # the base against itself: 0 by definition, no second pass
    policy_logprobs = score_responses(policy, bp, br, pad_id=pad).logprobs
    del policy  # before the base's model is loaded
    base_logprobs = score_responses(load_model(models.base, trust_remote_code=remote), bp, br, pad_id=pad).logprobs
    out["kl_base_policy"] = kl_per_token(base_logprobs, policy_logprobs)
    return out, 1


def samples_table(graded: Graded) -> pd.DataFrame:
    """One row per prompt: id, gold answer, the k samples and their rewards, the greedy completion and its reward."""
    rows, per_prompt = graded.rows, graded.per_prompt
    return pd.DataFrame({
        "id": rows["id"].astype(str), "answer": rows["answer"].astype(str),
        "samples": [[c.text for c in cs] for cs in graded.sampled], "rewards": [s.rewards for s in per_prompt],
        "greedy": [g[0].text for g in graded.greedy], "greedy_reward": [s.greedy_reward for s in per_prompt],
    })
