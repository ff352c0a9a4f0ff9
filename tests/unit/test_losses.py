"""Every loss against its float64 loop reference (value and gradient), hand-derived cases, invariances."""

import math

import pytest
import torch
from torch.testing import assert_close

from pipeline.algo.advantages import group_advantages
from pipeline.model.logprobs import token_logprobs, token_logprobs_from_logits
from pipeline.algo.losses import dft_loss, gft_loss, grpo_loss, sft_loss
from pipeline.algo.sampler import importance_weights, sampler_mismatch
from tests.reference import (
    gft_reference, grpo_reference, importance_weights_reference, mismatch_reference, token_stats_reference,
)

SHAPES = [(1, 1), (3, 7), (8, 16)]


def _inputs(shape, seed, per_token=False):
    g = torch.Generator().manual_seed(seed)
    n, t = shape
    # log-probs spread over (-6, 0) so that p crosses every tau in the tests
    logprobs = (-6 * torch.rand(n, t, generator=g, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn((n, t) if per_token else (n,), generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) < 0.75
    mask[:, 0] = True  # every row has a token
    return logprobs, advantages, mask


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.5, 0.7, 2.0])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("normalizer", [None, 37.0])
def test_gft_matches_reference(shape, seed, tau, per_token, normalizer):
    lp, adv, mask = _inputs(shape, seed, per_token)
    out = gft_loss(lp, adv, mask, tau=tau, normalizer=normalizer)
    ref = gft_reference(lp, adv, mask, tau=tau, normalizer=normalizer)
    assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    assert_close(_grad(out.loss, lp), _grad(ref, lp), rtol=1e-12, atol=1e-12)
    p = lp.detach().exp()[mask]
    assert out.metrics["rectified_frac"].item() == pytest.approx(float((p <= tau).double().mean()))


def test_gft_float32_close_to_float64_reference():
    lp, adv, mask = _inputs((8, 16), 5)
    lp32 = lp.detach().float().requires_grad_()
    out = gft_loss(lp32, adv.float(), mask, tau=0.5)
    ref = gft_reference(lp, adv, mask, tau=0.5)
    assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert_close(_grad(out.loss, lp32).double(), _grad(ref, lp), rtol=1e-5, atol=1e-6)


def test_p_exactly_at_tau_is_rectified():
    # p = 0.5 = tau: C = sg(p) = 0.5, so loss = -A * 0.5 * log 0.5 and d loss / d log p = -A * 0.5.
    lp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    assert math.exp(lp.item()) == 0.5
    out = gft_loss(lp, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), tau=0.5)
    assert out.loss.item() == pytest.approx(-2.0 * 0.5 * math.log(0.5))  # = 0.6931...
    assert _grad(out.loss, lp).item() == pytest.approx(-1.0)
    assert out.metrics["rectified_frac"].item() == 1.0
    # p = 0.6 > tau: C = 1, loss = -A log 0.6, gradient -A = -2.
    lp2 = torch.tensor([[math.log(0.6)]], dtype=torch.float64, requires_grad=True)
    out2 = gft_loss(lp2, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), tau=0.5)
    assert out2.loss.item() == pytest.approx(-2.0 * math.log(0.6))
    assert _grad(out2.loss, lp2).item() == pytest.approx(-2.0)
    assert out2.metrics["coef_mean"].item() == 1.0


def test_all_equal_group_has_zero_advantage_and_zero_gradient():
    # Rewards [1, 1, 1, 1]: mean 1, std 0, A = 0 / (0 + 1e-6) = 0 for every member, expert included.
    adv = group_advantages(torch.ones(4, dtype=torch.float64), ["x"] * 4).advantages
    assert torch.equal(adv, torch.zeros(4, dtype=torch.float64))
    lp, _, mask = _inputs((4, 5), 0)
    out = gft_loss(lp, adv, mask, tau=0.5)
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(_grad(out.loss, lp)) == 0


def test_singleton_group_uses_the_reward_as_advantage():
    # One member with R = 1: mean 0, std 1, A = 1 / (1 + 1e-6); with tau = 0 this is SFT up to that factor.
    adv = group_advantages(torch.tensor([1.0], dtype=torch.float64), ["solo"]).advantages
    assert adv.item() == pytest.approx(1.0 / (1 + 1e-6), rel=1e-12)
    lp, _, mask = _inputs((1, 6), 3)
    assert_close(gft_loss(lp, adv, mask, tau=0.0).loss, sft_loss(lp, mask).loss / (1 + 1e-6))


@pytest.mark.parametrize("seed", [0, 1])
def test_dft_is_detached_probability_times_nll_per_token(seed):
    lp, _, mask = _inputs((4, 9), seed)
    for i, t in mask.nonzero().tolist():  # one token at a time: exactly -exp(logp).detach() * logp
        one = torch.zeros_like(mask)
        one[i, t] = True
        out = dft_loss(lp, one)
        expected = -lp[i, t].detach().exp() * lp[i, t]
        assert_close(out.loss, expected, rtol=1e-13, atol=0)
        assert_close(_grad(out.loss, lp)[i, t], -lp[i, t].detach().exp(), rtol=1e-13, atol=0)
    total = dft_loss(lp, mask, normalizer=1.0).loss
    assert_close(total, (-lp.detach().exp() * lp)[mask].sum())


def test_sft_is_mean_negative_log_likelihood():
    lp, _, mask = _inputs((5, 8), 4)
    out = sft_loss(lp, mask)
    assert_close(out.loss, -lp[mask].mean())
    assert_close(_grad(out.loss, lp), -mask.double() / mask.sum())
    assert out.metrics["rectified_frac"].item() == 0.0


def test_gft_without_dcr_is_advantage_weighted_nll():
    lp, adv, mask = _inputs((6, 7), 8)
    out = gft_loss(lp, adv, mask, tau=0.0)
    assert_close(out.loss, (-adv[:, None] * lp)[mask].sum() / mask.sum())


def test_appending_masked_tokens_changes_nothing():
    lp, adv, mask = _inputs((4, 6), 11)
    garbage = torch.tensor([[-math.inf, math.nan, -3.0]] * 4, dtype=torch.float64)
    lp_long = torch.cat([lp.detach(), garbage], dim=1).requires_grad_()
    mask_long = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    for tau in (0.0, 0.5, 2.0):
        short = gft_loss(lp, adv, mask, tau=tau)
        long = gft_loss(lp_long, adv, mask_long, tau=tau)
        assert_close(long.loss, short.loss, rtol=0, atol=0)
        g = _grad(long.loss, lp_long)
        assert_close(g[:, :6], _grad(short.loss, lp), rtol=0, atol=0)
        assert torch.count_nonzero(g[:, 6:]) == 0
        for name, value in short.metrics.items():
            assert_close(long.metrics[name], value)


def test_permuting_members_within_a_group_changes_nothing():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (8,), generator=g).double()
    groups = ["a"] * 4 + ["b"] * 4
    lp, _, mask = _inputs((8, 5), 2)
    perm = torch.tensor([2, 0, 3, 1, 7, 5, 4, 6])  # within a: 0-3, within b: 4-7
    adv = group_advantages(rewards, groups).advantages
    adv_p = group_advantages(rewards[perm], [groups[i] for i in perm]).advantages
    assert_close(adv_p, adv[perm])
    lp_p = lp.detach()[perm].requires_grad_()
    out, out_p = gft_loss(lp, adv, mask, tau=0.5), gft_loss(lp_p, adv_p, mask[perm], tau=0.5)
    assert_close(out_p.loss, out.loss, rtol=1e-14, atol=0)
    assert_close(_grad(out_p.loss, lp_p), _grad(out.loss, lp)[perm], rtol=1e-14, atol=0)


@pytest.mark.parametrize("loss_fn", ["gft", "grpo"])
def test_micro_batches_with_global_normalizer_equal_one_batch(loss_fn):
    lp, adv, mask = _inputs((8, 10), 9)
    old = lp.detach() + 0.3 * torch.randn(8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(rows, normalizer):
        if loss_fn == "gft":
            return gft_loss(lp[rows], adv[rows], mask[rows], tau=0.5, normalizer=normalizer).loss
        return grpo_loss(lp[rows], old[rows], adv[rows], mask[rows], eps_low=0.2, eps_high=0.28,
                         normalizer=normalizer).loss

    whole = _grad(run(slice(0, 8), None), lp)
    total = int(mask.sum())
    parts = sum(_grad(run(slice(s, s + 2), total), lp) for s in range(0, 8, 2))
    assert_close(parts, whole, rtol=1e-6, atol=1e-15)


def test_shape_errors_name_both_shapes():
    lp = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"mask shape \(3, 5\).*logprobs shape \(3, 4\)"):
        gft_loss(lp, torch.zeros(3), torch.ones(3, 5, dtype=torch.bool), tau=0.5)
    with pytest.raises(ValueError, match=r"advantages shape \(2,\).*logprobs shape \(3, 4\)"):
        gft_loss(lp, torch.zeros(2), torch.ones(3, 4, dtype=torch.bool), tau=0.5)
    with pytest.raises(ValueError, match=r"old_logprobs shape \(3, 3\).*logprobs shape \(3, 4\)"):
        grpo_loss(lp, torch.zeros(3, 3), torch.zeros(3), torch.ones(3, 4, dtype=torch.bool), eps_low=0.2, eps_high=0.2)


# --------------------------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("normalizer", [None, 13.0])
def test_grpo_matches_reference(shape, seed, aggregation, beta, normalizer):
    lp, adv, mask = _inputs(shape, seed)
    g = torch.Generator().manual_seed(seed + 100)
    old = lp.detach() + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)  # ratios well outside the clip
    ref_lp = lp.detach() + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, ref_logprobs=ref_lp, aggregation=aggregation,
              normalizer=normalizer)
    out = grpo_loss(lp, old, adv, mask, **kw)
    ref = grpo_reference(lp, old, adv, mask, **kw)
    assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    assert_close(_grad(out.loss, lp), _grad(ref, lp), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "dr_grpo"])
def test_grpo_with_importance_weights_matches_reference(seed, aggregation):
    lp, adv, mask = _inputs((5, 8), seed)
    g = torch.Generator().manual_seed(seed + 7)
    old = lp.detach() + 0.4 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    w = 3.0 * torch.rand(5, 8, generator=g, dtype=torch.float64)  # weights in [0, 3): a truncated IS ratio
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, ref_logprobs=old - 0.1, aggregation=aggregation,
              is_weights=w)
    out = grpo_loss(lp, old, adv, mask, **kw)
    ref = grpo_reference(lp, old, adv, mask, **kw)
    assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    assert_close(_grad(out.loss, lp), _grad(ref, lp), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "dr_grpo"])
def test_grpo_flat_tokens_with_sequence_index_equal_padded_rows(aggregation):
    # The trainer hands grpo_loss flat [M] tokens with each token's sequence: the same loss and gradient as
    # the padded [N, T] rows, with the step's global normalizer (constant: sequences x T).
    lp, adv, mask = _inputs((6, 7), 4)
    old = lp.detach() + 0.3 * torch.randn(6, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = torch.arange(6)[:, None].expand(6, 7)
    normalizer = {"token-mean": None, "seq-mean-token-mean": None, "dr_grpo": 6 * 7}[aggregation]
    padded = grpo_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation=aggregation)
    flat = grpo_loss(lp[mask], old[mask], adv[:, None].expand(6, 7)[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                     eps_low=0.2, eps_high=0.28, aggregation=aggregation, normalizer=normalizer, seq_index=rows[mask])
    assert_close(flat.loss, padded.loss, rtol=1e-13, atol=1e-15)
    assert_close(_grad(flat.loss, lp), _grad(padded.loss, lp), rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="seq_index"):
        grpo_loss(lp[mask], old[mask], adv[:, None].expand(6, 7)[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                  eps_low=0.2, eps_high=0.2, aggregation="seq-mean-token-mean")


@pytest.mark.parametrize("level", ["none", "token", "sequence"])
@pytest.mark.parametrize("cap", [1.0, 1.5, 3.0, 1e9])
@pytest.mark.parametrize("seed", [0, 1])
def test_importance_weights_match_reference(level, cap, seed):
    mode = {"none": "none", "token": "token_truncate", "sequence": "sequence_truncate"}[level]
    g = torch.Generator().manual_seed(seed)
    lp = -3 * torch.rand(6, 9, generator=g, dtype=torch.float64)
    q = lp + 0.3 * torch.randn(6, 9, generator=g, dtype=torch.float64)  # a visible sampler/trainer gap
    mask = torch.rand(6, 9, generator=g) < 0.7
    mask[:, 0] = True
    out = importance_weights(lp, q, mask, mode=mode, cap=cap)
    ref = importance_weights_reference(lp, q, mask, level=level, cap=cap)
    assert_close(out.weights, ref, rtol=1e-13, atol=0)
    values = ref[mask] if level != "sequence" else ref[:, 0]
    name = "sampling/importance_sampling_ratio"
    assert out.metrics[f"{name}/max"].item() == pytest.approx(float(values.max()), rel=1e-13)
    assert out.metrics[f"{name}/mean"].item() == pytest.approx(float(values.mean()), rel=1e-13)
    assert out.metrics[f"{name}/min"].item() == pytest.approx(float(values.min()), rel=1e-13)
    assert float(out.weights.max()) <= cap


def test_importance_weights_hand_cases():
    # One sequence of two tokens with log(p / q) = [log 2, log 2]: token weights [2, 2]; sequence weight 4,
    # truncated to the cap 3; a masked token keeps weight 1.
    lp = torch.tensor([[math.log(2.0), math.log(2.0), 5.0]], dtype=torch.float64)
    q = torch.zeros(1, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    assert importance_weights(lp, q, mask, mode="token_truncate", cap=3.0).weights.tolist() == [[2.0, 2.0, 1.0]]
    assert importance_weights(lp, q, mask, mode="sequence_truncate", cap=3.0).weights.tolist() == [[3.0, 3.0, 1.0]]
    assert importance_weights(lp, q, mask, mode="sequence_truncate", cap=10.0).weights[0, :2].tolist() == pytest.approx([4, 4])
    with pytest.raises(ValueError, match="unknown importance sampling mode"):
        importance_weights(lp, q, mask, mode="token", cap=3.0)


def test_sampler_mismatch_matches_reference():
    g = torch.Generator().manual_seed(3)
    lp = -2 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    q = lp + 0.2 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) < 0.8
    mask[:, 0] = True
    out, ref = sampler_mismatch(lp, q, mask), mismatch_reference(lp, q, mask)
    assert out["sampling/sampling_logp_difference/mean"].item() == pytest.approx(ref["mean"], rel=1e-13)
    assert out["sampling/sampling_logp_difference/max"].item() == pytest.approx(ref["max"], rel=1e-13)
    assert out["sampling/kl_k3"].item() == pytest.approx(ref["k3"], rel=1e-12)
    same = sampler_mismatch(lp, lp.clone(), mask)
    assert all(v.item() == 0.0 for v in same.values())


CLIP_CASES = [
    # (log ratio, A, loss, d loss / d logp, low clipped, high clipped); eps_low 0.2, eps_high 0.28
    # r = e^0.1 = 1.105 inside [0.8, 1.28]: loss -r A, gradient -r A
    (0.1, 1.0, -math.exp(0.1), -math.exp(0.1), 0, 0),
    # r = e^0.5 = 1.649 > 1.28 with A > 0: min(1.649, 1.28) = 1.28 is the clipped constant, gradient 0
    (0.5, 1.0, -1.28, 0.0, 0, 1),
    # r = 1.649 > 1.28 with A < 0: min(-1.649, -1.28) = -1.649 unclipped, loss 1.649, gradient -r A = 1.649
    (0.5, -1.0, math.exp(0.5), math.exp(0.5), 0, 0),
    # r = e^-0.5 = 0.607 < 0.8 with A < 0: min(-0.607, -0.8) = -0.8 clipped, loss 0.8, gradient 0
    (-0.5, -1.0, 0.8, 0.0, 1, 0),
    # r = 0.607 < 0.8 with A > 0: min(0.607, 0.8) = 0.607 unclipped, loss -0.607, gradient -0.607
    (-0.5, 1.0, -math.exp(-0.5), -math.exp(-0.5), 0, 0),
]


@pytest.mark.parametrize("log_ratio,adv,loss,grad,low,high", CLIP_CASES)
def test_grpo_clip_cases(log_ratio, adv, loss, grad, low, high):
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0 - log_ratio]], dtype=torch.float64)
    out = grpo_loss(lp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
                    eps_low=0.2, eps_high=0.28)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    assert _grad(out.loss, lp).item() == pytest.approx(grad, rel=1e-12, abs=1e-15)
    assert out.metrics["clip_ratio/low_mean"].item() == low
    assert out.metrics["clip_ratio/high_mean"].item() == high
    assert out.metrics["clip_ratio/region_mean"].item() == max(low, high)


def test_grpo_on_policy_is_the_policy_gradient():
    # num_iterations = 1: old = current (detached), so r = 1 exactly and grad = grad of -sum(A log p) / N.
    lp, adv, mask = _inputs((6, 9), 21)
    out = grpo_loss(lp, lp.detach(), adv, mask, eps_low=0.2, eps_high=0.28)
    assert out.metrics["ratio_mean"].item() == 1.0
    assert out.metrics["clip_ratio/region_mean"].item() == 0.0
    pg = (-adv[:, None] * lp)[mask].sum() / mask.sum()
    assert_close(out.loss, -adv[:, None].expand_as(lp)[mask].mean(), rtol=1e-14, atol=1e-14)
    assert_close(_grad(out.loss, lp), _grad(pg, lp), rtol=1e-14, atol=1e-15)


def test_grpo_k3_kl_value():
    # logp = -1, ref = -1.5: d = ref - logp = -0.5, k3 = e^-0.5 + 0.5 - 1 = 0.10653; A = 0 isolates the KL term.
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    out = grpo_loss(lp, lp.detach(), torch.zeros(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
                    eps_low=0.2, eps_high=0.2, beta=0.5, ref_logprobs=torch.tensor([[-1.5]], dtype=torch.float64))
    k3 = math.exp(-0.5) + 0.5 - 1
    assert out.metrics["kl"].item() == pytest.approx(k3)
    assert out.loss.item() == pytest.approx(0.5 * k3)
    # d k3 / d logp = -e^d + 1 = 1 - e^-0.5
    assert _grad(out.loss, lp).item() == pytest.approx(0.5 * (1 - math.exp(-0.5)))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 1, dtype=torch.bool), eps_low=0.2, eps_high=0.2,
                  beta=0.1)


# --------------------------------------------------------------------------------------------- token log-probs


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("keep_logits", [False, True])
def test_token_logprobs_from_hidden_match_full_log_softmax(chunk_size, with_bias, keep_logits):
    g = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(29, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 29, (13,), generator=g)
    stats = token_logprobs(hidden, weight, labels, bias=bias, chunk_size=chunk_size, keep_logits=keep_logits)
    ref_lp, ref_ent = token_stats_reference(hidden, weight, bias, labels)
    assert_close(stats.logprobs, ref_lp, rtol=1e-12, atol=1e-12)
    assert_close(stats.entropy, ref_ent.detach(), rtol=1e-12, atol=1e-12)
    assert not stats.entropy.requires_grad
    upstream = torch.randn(13, generator=g, dtype=torch.float64)
    params = [hidden, weight] + ([bias] if with_bias else [])
    got = torch.autograd.grad((stats.logprobs * upstream).sum(), params)
    want = torch.autograd.grad((ref_lp * upstream).sum(), params)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_token_logprobs_from_logits_bf16_close_to_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 50, generator=g)
    labels = torch.randint(0, 50, (10,), generator=g)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    lb = logits.bfloat16().requires_grad_()
    stats = token_logprobs_from_logits(lb, labels, chunk_size=4)
    assert stats.logprobs.dtype == torch.float32  # upcast per chunk
    assert_close(stats.logprobs.double(), ref, rtol=0, atol=0.05)
    exact = token_logprobs_from_logits(logits.double(), labels, chunk_size=3)
    assert_close(exact.logprobs, ref, rtol=1e-12, atol=1e-12)


def _head_case(n: int, h: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [n, h] and head weight [v, h] (both requiring grad), labels [n]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    return hidden, weight, torch.randint(0, v, (n,), generator=g)


def test_no_full_vocab_float32_tensor_is_saved_for_backward():
    # Record every tensor autograd saves for backward: none may be as large as [N, V] when chunking.
    n, h, v, chunk = 64, 16, 500, 16
    hidden, weight, labels = _head_case(n, h, v, seed=0)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stats = token_logprobs(hidden, weight, labels, chunk_size=chunk)
    assert saved and max(saved) < n * v / 2, f"a saved tensor has {max(saved)} elements (full logits: {n * v})"
    stats.logprobs.sum().backward()  # recomputation in backward works
    assert hidden.grad is not None and weight.grad is not None
    # The hook does see an unchunked log-softmax's [N, V] output, so the check above can fail.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.log_softmax(hidden @ weight.T, -1)
    assert max(saved) >= n * v


class _MatmulCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matmuls (mm / addmm) that run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
        return func(*args, **(kwargs or {}))


def test_keep_logits_saves_them_and_skips_the_recompute_matmul():
    n, h, v, chunk = 40, 8, 300, 16
    hidden, weight, labels = _head_case(n, h, v, seed=5)
    chunks = -(-n // chunk)
    grads, counts = [], []
    for keep in (False, True):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            stats = token_logprobs(hidden, weight, labels, chunk_size=chunk, keep_logits=keep)
        logits = [s for s in saved if len(s) == 2 and s[1] == v]  # [rows, V] blocks
        assert logits == ([(chunk, v)] * (n // chunk) + [(n % chunk, v)] if keep else [])
        with _MatmulCount() as mm:
            grads.append(torch.autograd.grad(stats.logprobs.sum(), [hidden, weight]))
        counts.append(mm.count)
    assert counts == [3 * chunks, 2 * chunks]  # recompute + grad_h + grad_w per chunk, then without the recompute
    for a, b in zip(*grads):
        assert torch.equal(a, b)



def test_keep_logits_keeps_nothing_without_grad(monkeypatch):
    import weakref

    from pipeline.model import logprobs

    made, live = [], []  # weak references to every chunk's logits; how many were alive at each new chunk

    def logits(*args):
        live.append(sum(r() is not None for r in made))
        made.append(weakref.ref(z := head_logits(*args)))
        return z

    head_logits = logprobs._head_logits
    monkeypatch.setattr(logprobs, "_head_logits", logits)
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(40, 8, generator=g), torch.randn(300, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (40,), generator=g)
    stats = token_logprobs(hidden, weight, labels, chunk_size=16, keep_logits=True)
    assert live == [0, 1, 2]  # with grad, every chunk's logits stay for backward
    made.clear(), live.clear()
    with torch.no_grad():
        token_logprobs(hidden, weight, labels, chunk_size=16, keep_logits=True)
    assert live == [0, 1, 1]  # without: only the previous chunk's, until it is replaced
    del stats


def test_fused_head_under_bf16_autocast_close_to_float32():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(300, 16, generator=g)).requires_grad_()
    labels = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = token_logprobs(hidden, weight, labels, chunk_size=16)
    assert stats.logprobs.dtype == torch.float32
    ref_lp, ref_ent = token_stats_reference(hidden, weight, None, labels)
    assert_close(stats.logprobs.double(), ref_lp.detach(), rtol=0, atol=0.05)
    assert_close(stats.entropy.double(), ref_ent.detach(), rtol=0, atol=0.05)
    gh, gw = torch.autograd.grad(stats.logprobs.sum(), [hidden, weight])
    rh, rw = torch.autograd.grad(ref_lp.sum(), [hidden, weight])
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert_close(gh.double(), rh.double(), rtol=0.05, atol=0.02)
    assert_close(gw.double(), rw.double(), rtol=0.05, atol=0.02)
