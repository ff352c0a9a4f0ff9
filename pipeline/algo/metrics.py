"""Evaluation metrics (docs/design.md section 1.9) and the comparison table across checkpoints: pure functions
of rewards and log-probs.

For each held-out prompt: k samples at `temperature` give mean@k (the paper's "Pass@16 Average": mean
correctness over samples) and the unbiased pass@k estimator; one greedy completion gives greedy accuracy;
token entropy is the policy's mean entropy on its own samples; KL(base || policy) is measured on samples of
the base model, per token: E_{y ~ base}[log base(y_t) - log policy(y_t)] (the paper's forgetting proxy);
answer diversity is the number of distinct final answers among the k samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["pass_at_k", "EvalSamples", "accuracy_metrics", "kl_per_token", "comparison_table"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass(frozen=True)
class EvalSamples:
    """Scored completions of one prompt: k sampled texts with rewards, and the greedy one."""

    rewards: list[float]
    answers: list[str | None]
    greedy_reward: float


def accuracy_metrics(samples: Sequence[EvalSamples], *, k: int) -> dict[str, float]:
    """mean@k, pass@k (and pass@1), greedy accuracy and distinct answers, averaged over prompts."""
    if not samples:
        raise ValueError("no prompts to evaluate")
    n = len(samples[0].rewards)
    correct = [sum(r > 0.5 for r in s.rewards) for s in samples]
    return {
        f"mean@{n}": sum(c / n for c in correct) / len(samples),
        f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(samples),
        "pass@1": sum(pass_at_k(n, c, 1) for c in correct) / len(samples),
        "greedy_accuracy": sum(s.greedy_reward > 0.5 for s in samples) / len(samples),
        "distinct_answers": sum(len({a for a in s.answers if a is not None}) for s in samples) / len(samples),
        "no_answer_frac": sum(a is None for s in samples for a in s.answers) / (n * len(samples)),
    }


def kl_per_token(base_logprobs: Sequence[torch.Tensor], policy_logprobs: Sequence[torch.Tensor]) -> float:
    """Mean over base-sampled tokens of log base - log policy: a Monte-Carlo KL(base || policy) per token."""
    num = sum(float((b - p).sum()) for b, p in zip(base_logprobs, policy_logprobs))
    den = sum(b.numel() for b in base_logprobs)
    return num / max(den, 1)


def comparison_table(rows: Mapping[str, Mapping[str, float]], *, columns: Sequence[str] | None = None) -> str:
    """A markdown table: one row per checkpoint (in the given order), one column per metric."""
    columns = list(columns or dict.fromkeys(c for r in rows.values() for c in r))
    lines = ["| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, "-"))
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
