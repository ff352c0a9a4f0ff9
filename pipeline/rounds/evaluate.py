"""Evaluation of one checkpoint on held-out prompts: grade every sample with the verifier.

The metrics themselves (mean@k, pass@k, greedy accuracy, KL) are pure functions in `pipeline.algo.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipeline.algo.metrics import EvalSamples
from pipeline.rollout.verifiers import Verifier, last_boxed

__all__ = ["grade_prompt"]


def grade_prompt(verifier: Verifier, row: Mapping, sampled: Sequence[str], greedy: str) -> EvalSamples:
    """Score k samples and one greedy completion of one prompt (None rewards count as 0)."""
    out = verifier.reward(list(sampled) + [greedy], [row] * (len(sampled) + 1))
    rewards = [r or 0.0 for r in out.rewards]
    return EvalSamples(rewards=rewards[:-1], answers=[last_boxed(t) for t in sampled], greedy_reward=rewards[-1])
