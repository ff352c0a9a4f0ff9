"""group_advantages against its float64 loop reference, hand-derived cases and invariances."""

import random

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from pipeline.algo.advantages import group_advantages
from tests.reference import advantages_reference


def _batch(seed, n_groups, max_size, binary):
    rng = random.Random(seed)
    ids, rewards = [], []
    for g in range(n_groups):
        size = rng.randint(1, max_size)  # singletons included
        ids += [f"prompt-{g}"] * size
        rewards += [float(rng.random() < 0.5) if binary else rng.gauss(0, 2) for _ in range(size)]
    order = list(range(len(ids)))
    rng.shuffle(order)  # groups interleaved, as a sampler may return them
    return [rewards[i] for i in order], [ids[i] for i in order]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_groups,max_size", [(1, 1), (1, 8), (5, 4), (20, 9)])
@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("binary", [True, False])
def test_matches_loop_reference_value_and_gradient(seed, n_groups, max_size, scale, baseline, binary):
    rewards, ids = _batch(seed, n_groups, max_size, binary)
    r = torch.tensor(rewards, dtype=torch.float64, requires_grad=True)
    out = group_advantages(r, ids, scale=scale, baseline=baseline)
    ref = torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in
                       advantages_reference(list(r.unbind()), ids, scale=scale, baseline=baseline)])
    assert_close(out.advantages, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(len(rewards), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (g_out,) = torch.autograd.grad((out.advantages * w).sum(), r)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), r)
    # The reference's sqrt has an infinite derivative at zero variance (all-equal groups); the library
    # takes the subgradient 0 there. Compare where the reference is defined; the library is finite everywhere.
    assert torch.isfinite(g_out).all()
    ok = torch.isfinite(g_ref)
    assert_close(g_out[ok], g_ref[ok], rtol=1e-10, atol=1e-10)


def test_one_wrong_of_four():
    # R = [1, 0, 0, 0]: mean 0.25; Bessel std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5
    # A = [0.75, -0.25, -0.25, -0.25] / (0.5 + 1e-6) = [1.5, -0.5, -0.5, -0.5] (to 2e-6 relative)
    out = group_advantages([1.0, 0.0, 0.0, 0.0], ["q"] * 4)
    assert_close(out.advantages, torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64) * 0.5 / (0.5 + 1e-6))


def test_seven_right_one_wrong_is_the_papers_example():
    # mean 0.875, Bessel std 0.35355: A(right) = 0.125 / 0.35355 = 0.354, A(wrong) = -0.875 / 0.35355 = -2.475
    out = group_advantages([1.0] * 7 + [0.0], ["q"] * 8).advantages
    assert out[0].item() == pytest.approx(0.35355, abs=1e-4)
    assert out[7].item() == pytest.approx(-2.47487, abs=1e-4)


def test_leave_one_out_and_unscaled():
    # RLOO: b_k = mean of the others. R = [1, 0, 0]: b = [0, 0.5, 0.5], A = [1, -0.5, -0.5] unscaled.
    out = group_advantages([1.0, 0.0, 0.0], [7, 7, 7], scale="none", baseline="leave_one_out")
    assert_close(out.advantages, torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64))
    # Dr.GRPO: R - mean, no std: [2/3, -1/3, -1/3]
    out = group_advantages([1.0, 0.0, 0.0], [7, 7, 7], scale="none")
    assert_close(out.advantages, torch.tensor([2 / 3, -1 / 3, -1 / 3], dtype=torch.float64))


def test_all_equal_and_singleton_groups_and_stats():
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    ids = ["same", "same", "same", "zeros", "zeros", "mixed", "mixed", "solo"]
    out = group_advantages(rewards, ids)
    a = out.advantages
    assert torch.equal(a[:5], torch.zeros(5, dtype=torch.float64))  # zero-variance groups: no gradient
    assert a[7].item() == pytest.approx(1.0 / (1 + 1e-6))  # singleton: A = R
    assert a[5].item() == pytest.approx(0.7071, abs=1e-4) and a[6].item() == pytest.approx(-0.7071, abs=1e-4)
    assert out.stats["num_groups"] == 4
    assert out.stats["frac_reward_zero_std"] == 0.5  # "same" and "zeros" of 4 groups
    assert out.stats["frac_singleton_groups"] == 0.25
    assert out.stats["reward_mean"] == pytest.approx(5 / 8)


def test_permutation_permutes():
    rewards, ids = _batch(7, 6, 6, binary=True)
    perm = np.random.default_rng(0).permutation(len(ids))
    out = group_advantages(rewards, ids).advantages
    out_p = group_advantages([rewards[i] for i in perm], [ids[i] for i in perm]).advantages
    assert_close(out_p, out[torch.as_tensor(perm)], rtol=1e-15, atol=0)


def test_group_id_types():
    t = group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([3, 3, 4])).advantages
    s = group_advantages([1.0, 0.0, 1.0], np.array(["a", "a", "b"])).advantages
    assert t.dtype == torch.float32
    assert_close(t.double(), s)


def test_non_finite_reward_names_the_group():
    with pytest.raises(ValueError, match=r"group\(s\) \['prompt-b'\] at row\(s\) \[2\]"):
        group_advantages([1.0, 0.0, float("nan"), 1.0], ["prompt-a", "prompt-a", "prompt-b", "prompt-b"])
    with pytest.raises(ValueError, match="prompt-a"):
        group_advantages([float("inf"), 0.0], ["prompt-a", "prompt-a"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="3 entries but rewards has 2"):
        group_advantages([1.0, 0.0], ["a", "a", "b"])
    with pytest.raises(ValueError, match="baseline"):
        group_advantages([1.0], ["a"], baseline="median")
    with pytest.raises(ValueError, match="scale"):
        group_advantages([1.0], ["a"], scale="global")
