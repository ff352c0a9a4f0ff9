"""Evaluation metrics against brute-force references and hand-derived cases."""

import itertools

import pytest
import torch

from pipeline.algo.metrics import EvalSamples, accuracy_metrics, comparison_table, kl_per_token, pass_at_k


def _pass_at_k_brute(n, c, k):
    """Fraction of all k-subsets of n samples (c correct) holding at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12)


def test_pass_at_k_hand_cases():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 * 2) / (4 * 3))  # 1 - C(3,2)/C(4,2) = 0.5
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError, match="n=2, c=3"):
        pass_at_k(2, 3, 1)


def test_accuracy_metrics_hand_case():
    # prompt A: 2 of 4 right, greedy right, answers {1, 2}; prompt B: 0 of 4, greedy wrong, one unanswered
    a = EvalSamples(rewards=[1.0, 0.0, 1.0, 0.0], answers=["1", "2", "1", "2"], greedy_reward=1.0)
    b = EvalSamples(rewards=[0.0] * 4, answers=["3", None, "4", "5"], greedy_reward=0.0)
    m = accuracy_metrics([a, b], k=2)
    assert m["mean@4"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["pass@2"] == pytest.approx((1 - 1 / 6 + 0.0) / 2)  # A: 1 - C(2,2)/C(4,2) = 5/6
    assert m["greedy_accuracy"] == 0.5
    assert m["distinct_answers"] == pytest.approx((2 + 3) / 2)
    assert m["no_answer_frac"] == pytest.approx(1 / 8)


def test_kl_per_token():
    base = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    policy = [torch.tensor([-1.5, -2.0]), torch.tensor([-1.0])]
    # (0.5 + 0 + 0.5) / 3 tokens
    assert kl_per_token(base, policy) == pytest.approx(1 / 3)
    assert kl_per_token(base, base) == 0.0


def test_comparison_table():
    table = comparison_table({"base": {"acc": 0.25, "n": 3}, "gft": {"acc": 0.5}}, columns=["acc", "n"])
    assert table.splitlines() == ["| checkpoint | acc | n |", "|---|---|---|", "| base | 0.2500 | 3 |",
                                  "| gft | 0.5000 | - |"]
