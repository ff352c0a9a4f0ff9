"""The GRPO options of verl and TRL (issue 17): each against a float64 loop written from the peer's documented
semantics (value and gradient), hand cases, and the config's refusals.

Peers' semantics used here (docs/design.md section 1.7):
- verl compute_policy_loss_vanilla: max(-A r, -A clip(r)); for A < 0 also min(that, -A clip_ratio_c).
- TRL delta: the unclipped ratio is clamped to at most delta before -min(r A, clip(r) A).
- verl kl_penalty: kl = lp - ref; abs = |lp - ref|; mse = (lp - ref)^2 / 2; low_var_kl = exp(ref - lp) - (ref -
  lp) - 1 with ref - lp clamped to [-20, 20] and the result to [-10, 10].
- verl agg_loss: token-mean; seq-mean-token-sum; seq-mean-token-mean; seq-mean-token-sum-norm (sum / T).
- TRL importance_sampling_level="sequence": exp(sum_t m (lp - old) / sum_t m) for every token of the sequence.
- TRL vllm_importance_sampling_mode: *_truncate clamps to [clip_min, clip_max]; *_mask sets 0 outside it.
- TRL scale_rewards="batch": (R - group mean) / (std of the batch + eps).
- TRL normalize_then_sum: per reward, (R - nanmean) / (nanstd + eps) in each group (nanstd of one value is NaN),
  weighted nansum, unscorable rows NaN, then (S - nanmean S) / (nanstd S + eps), NaN -> 0.
- verl entropy_coeff: loss = pg_loss - entropy_coeff * agg(entropy).
"""

import math

import pytest
import torch
from torch.testing import assert_close

from pipeline.algo.advantages import group_advantages, masked_group_advantages, normalize_then_sum
from pipeline.algo.losses import gft_loss, grpo_loss, kl_penalty
from pipeline.algo.sampler import importance_weights
from pipeline.config import GFTConfig, GRPOConfig
from pipeline.model.scoring import TokenScorer, differentiable_entropy
from tests.conftest import PAD, random_examples, tiny_lm
from tests.reference import (
    advantages_reference, aggregate_reference, gft_reference, importance_weights_reference,
)

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "dr_grpo"]


# --------------------------------------------------------------------------------------------- loop references


def _const(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _clip(r: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """clip() with its gradient: r inside the range, a constant outside."""
    return r if low <= r.item() <= high else _const(min(max(r.item(), low), high))


def _larger(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a if a.item() >= b.item() else b


def _smaller(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a if a.item() <= b.item() else b


def _kl_reference(lp: torch.Tensor, ref: float, estimator: str, clamp: float | None) -> torch.Tensor:
    """verl's kl_penalty for one token, kl = lp - ref."""
    if estimator == "k1":
        return lp - ref
    if estimator == "abs":
        return lp - ref if lp.item() >= ref else ref - lp
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    d = ref - lp
    if clamp is not None:
        d = _clip(d, -20.0, 20.0)
    k3 = torch.exp(d) - d - 1
    return k3 if clamp is None else _clip(k3, -clamp, clamp)


def grpo_peer_reference(lp, old, adv, mask, *, eps_low, eps_high, dual_clip=None, level="token", beta=0.0,
                        ref=None, kl="k3", kl_clamp=None, entropy=None, entropy_coeff=0.0,
                        aggregation="token-mean", is_weights=None):
    """One Python loop per token; the per-sequence sums are aggregated as verl's agg_loss."""
    n, t_len = lp.shape
    zero = 0.0 * lp.sum() + (0.0 * entropy.sum() if entropy is not None else 0.0)
    sums, counts = [], []
    for i in range(n):
        toks = [t for t in range(t_len) if mask[i, t]]
        seq_log_ratio = sum((lp[i, t] - float(old[i, t]) for t in toks), zero) / max(len(toks), 1)
        total = zero
        for t in toks:
            a = float(adv[i])
            r = torch.exp(seq_log_ratio if level == "sequence" else lp[i, t] - float(old[i, t]))
            term = _larger(-a * r, -a * _clip(r, 1 - eps_low, 1 + eps_high))
            if dual_clip is not None and a < 0:
                term = _smaller(term, _const(-a * dual_clip))
            if is_weights is not None:
                term = term * float(is_weights[i, t])
            if beta:
                term = term + beta * _kl_reference(lp[i, t], float(ref[i, t]), kl, kl_clamp)
            if entropy_coeff:
                term = term - entropy_coeff * entropy[i, t]
            total = total + term
        sums.append(total)
        counts.append(len(toks))
    return aggregate_reference(sums, counts, aggregation, t_len, n)


def trl_delta_reference(lp, old, adv, mask, *, eps_low, eps_high, delta):
    """TRL's two-sided clip, token-mean: coef_1 = min(r, delta); -min(coef_1 A, clip(r) A)."""
    total, count = 0.0 * lp.sum(), 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            a = float(adv[i])
            r = torch.exp(lp[i, t] - float(old[i, t]))
            coef_1 = r if r.item() <= delta else _const(delta)
            total = total - _smaller(coef_1 * a, _clip(r, 1 - eps_low, 1 + eps_high) * a)
            count += 1
    return total / count


def normalize_then_sum_reference(per_func, group_ids, weights, eps):
    """TRL's normalize_then_sum on lists (None for a reward that does not apply)."""
    n, f_count = len(per_func), len(weights)

    def nanstats(vals):
        vals = [v for v in vals if v is not None]
        mean = sum(vals) / len(vals) if vals else math.nan
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else math.nan
        return mean, std

    normalized = [[None] * f_count for _ in range(n)]
    for f in range(f_count):
        for g in dict.fromkeys(group_ids):
            idx = [i for i in range(n) if group_ids[i] == g]
            mean, std = nanstats([per_func[i][f] for i in idx])
            for i in idx:
                v = per_func[i][f]
                x = math.nan if v is None else (v - mean) / (std + eps)
                normalized[i][f] = None if math.isnan(x) else x
    summed = [None if all(v is None for v in per_func[i]) else
              sum(w * x for w, x in zip(weights, normalized[i]) if x is not None) for i in range(n)]
    mean, std = nanstats(summed)
    return [0.0 if s is None else (s - mean) / (std + eps) for s in summed]


# --------------------------------------------------------------------------------------------- inputs


def _inputs(seed, n=6, t=7, spread=0.5, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    lp = (-4 * torch.rand(n, t, generator=g, dtype=torch.float64)).requires_grad_()
    old = lp.detach() + spread * torch.randn(n, t, generator=g, dtype=torch.float64)  # ratios outside the clip
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) < 0.75
    mask[:, 0] = True
    if empty_row:
        mask[1] = False  # a fully masked row
    return lp, old, adv, mask, g


def _grad(loss, *xs):
    return torch.autograd.grad(loss, xs)


def _check(out_loss, ref_loss, *leaves, tol=1e-12):
    assert_close(out_loss, ref_loss, rtol=tol, atol=tol)
    for got, want in zip(_grad(out_loss, *leaves), _grad(ref_loss, *leaves)):
        assert_close(got, want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("empty_row", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_aggregations_match_verl_agg_loss(aggregation, empty_row, seed):
    lp, old, adv, mask, _ = _inputs(seed, empty_row=empty_row)
    out = grpo_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation=aggregation)
    _check(out.loss, grpo_peer_reference(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation=aggregation), lp)


def test_seq_mean_token_sum_norm_divides_by_t_not_by_the_sequences():
    # Two rows of T = 4, one token each with loss -A r = -1 (A = 1, r = 1): sum -2; verl's sum-norm -2 / 4 = -0.5,
    # Dr.GRPO's -2 / (2 x 4) = -0.25, seq-mean-token-sum -2 / 2 = -1, and with one row empty -1 / 1 = -1.
    lp = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, 0] = True
    adv = torch.ones(2, dtype=torch.float64)
    loss = {a: grpo_loss(lp, lp.detach(), adv, mask, eps_low=0.2, eps_high=0.2, aggregation=a).loss.item()
            for a in AGGREGATIONS}
    assert loss == {"token-mean": -1.0, "seq-mean-token-mean": -1.0, "seq-mean-token-sum": -1.0,
                    "seq-mean-token-sum-norm": -0.5, "dr_grpo": -0.25}
    mask[1, 0] = False  # the empty row leaves seq-mean-token-mean and seq-mean-token-sum (verl), not the rest
    one = grpo_loss(lp, lp.detach(), adv, mask, eps_low=0.2, eps_high=0.2, aggregation="seq-mean-token-mean")
    assert one.loss.item() == -1.0
    assert grpo_loss(lp, lp.detach(), adv, mask, eps_low=0.2, eps_high=0.2, aggregation="dr_grpo").loss.item() == -0.125


@pytest.mark.parametrize("dual_clip", [None, 1.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_clip_matches_verl(dual_clip, seed):
    lp, old, adv, mask, _ = _inputs(seed, spread=1.5)  # many ratios above 3 and below 1/3
    out = grpo_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)
    ref = grpo_peer_reference(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)
    _check(out.loss, ref, lp)
    ratio = torch.exp(lp.detach() - old)
    active = ((ratio > (dual_clip or math.inf)) & (adv[:, None] < 0))[mask]
    if dual_clip is not None:
        assert active.any()  # the test exercises the dual clip
        assert out.metrics["pg_clipfrac_lower"].item() == pytest.approx(float(active.double().mean()))
    else:
        assert "pg_clipfrac_lower" not in out.metrics


@pytest.mark.parametrize("delta", [1.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_dual_clip_equals_trl_delta(delta, seed):
    lp, old, adv, mask, _ = _inputs(seed, spread=1.5)
    out = grpo_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=delta)
    _check(out.loss, trl_delta_reference(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, delta=delta), lp)


def test_dual_clip_hand_case():
    # r = e^1.5 = 4.48 > c = 3 with A = -1: max(4.48, clip 1.28) = 4.48 is bounded by c: loss 3, gradient 0.
    lp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-2.5]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = grpo_loss(lp, old, torch.tensor([-1.0], dtype=torch.float64), mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    assert out.loss.item() == 3.0 and _grad(out.loss, lp)[0].item() == 0.0
    plain = grpo_loss(lp, old, torch.tensor([-1.0], dtype=torch.float64), mask, eps_low=0.2, eps_high=0.28)
    assert plain.loss.item() == pytest.approx(math.exp(1.5))


@pytest.mark.parametrize("estimator", ["k1", "k2", "abs", "k3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_estimators_match_verl(estimator, seed):
    lp, old, adv, mask, g = _inputs(seed)
    ref = lp.detach() + 0.5 * torch.randn(lp.shape, generator=g, dtype=torch.float64)
    out = grpo_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.1, ref_logprobs=ref, kl_estimator=estimator)
    want = grpo_peer_reference(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.1, ref=ref, kl=estimator)
    _check(out.loss, want, lp)


def test_kl_estimator_hand_values_and_the_low_var_kl_clamp():
    # lp = 0, ref = -1 (d = ref - lp = -1): k1 = 1, k2 = 0.5, abs = 1, k3 = e^-1 + 1 - 1 = 0.3679.
    lp, ref = torch.zeros(1, 1, dtype=torch.float64), -torch.ones(1, 1, dtype=torch.float64)
    values = {e: kl_penalty(lp, ref, estimator=e).item() for e in ("k1", "k2", "abs", "k3")}
    assert values == pytest.approx({"k1": 1.0, "k2": 0.5, "abs": 1.0, "k3": math.exp(-1)})
    # d = 5: k3 = e^5 - 6 = 142.4, clamped to 10 with no gradient; d = 30 is first clamped to 20.
    far = torch.tensor([[0.0, -25.0]], dtype=torch.float64, requires_grad=True)
    clamped = kl_penalty(far, torch.tensor([[5.0, 5.0]], dtype=torch.float64), estimator="k3", clamp=10.0)
    assert clamped.tolist() == [[10.0, 10.0]]
    assert _grad(clamped.sum(), far)[0].tolist() == [[0.0, 0.0]]
    free = kl_penalty(far, torch.tensor([[5.0, 5.0]], dtype=torch.float64), estimator="k3")
    assert free[0, 0].item() == pytest.approx(math.exp(5) - 6)
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(lp, ref, estimator="k1", clamp=10.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_var_kl_clamp_matches_verl_where_it_binds(seed):
    lp, old, adv, mask, g = _inputs(seed)
    ref = lp.detach() + 4.0 * torch.randn(lp.shape, generator=g, dtype=torch.float64)  # k3 > 10 on some tokens
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, ref_logprobs=ref, kl_clamp=10.0)
    out = grpo_loss(lp, old, adv, mask, **kw)
    assert (kl_penalty(lp.detach(), ref) > 10)[mask].any()
    want = grpo_peer_reference(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.1, ref=ref, kl_clamp=10.0)
    _check(out.loss, want, lp)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_ratio_matches_trl_gspo(aggregation, seed):
    lp, old, adv, mask, _ = _inputs(seed, spread=0.3)
    out = grpo_loss(lp, old, adv, mask, eps_low=3e-4, eps_high=4e-4, ratio_level="sequence", aggregation=aggregation)
    want = grpo_peer_reference(lp, old, adv, mask, eps_low=3e-4, eps_high=4e-4, level="sequence",
                               aggregation=aggregation)
    _check(out.loss, want, lp)


def test_sequence_ratio_on_flat_tokens_equals_padded_rows():
    lp, old, adv, mask, _ = _inputs(3, spread=0.3)
    rows = torch.arange(lp.shape[0])[:, None].expand_as(lp)
    kw = dict(eps_low=0.2, eps_high=0.28, ratio_level="sequence", aggregation="seq-mean-token-mean")
    padded = grpo_loss(lp, old, adv, mask, **kw)
    flat = grpo_loss(lp[mask], old[mask], adv[:, None].expand_as(lp)[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                     seq_index=rows[mask], **kw)
    _check(flat.loss, padded.loss, lp, tol=1e-13)
    with pytest.raises(ValueError, match="seq_index"):
        grpo_loss(lp[mask], old[mask], adv[:, None].expand_as(lp)[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                  eps_low=0.2, eps_high=0.2, ratio_level="sequence")


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_bonus_matches_verl(aggregation, seed):
    lp, old, adv, mask, g = _inputs(seed)
    entropy = (2 * torch.rand(lp.shape, generator=g, dtype=torch.float64)).requires_grad_()
    w = 2 * torch.rand(lp.shape, generator=g, dtype=torch.float64)
    kw = dict(eps_low=0.2, eps_high=0.28, aggregation=aggregation, is_weights=w)
    out = grpo_loss(lp, old, adv, mask, entropy=entropy, entropy_coeff=0.01, **kw)
    want = grpo_peer_reference(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation=aggregation, is_weights=w,
                               entropy=entropy, entropy_coeff=0.01)
    _check(out.loss, want, lp, entropy)
    # verl's form: pg_loss - c * agg(entropy), agg with the same mode
    pg = grpo_loss(lp, old, adv, mask, **kw).loss
    assert_close(out.loss, pg - 0.01 * _agg(entropy.detach(), mask, aggregation), rtol=1e-12, atol=1e-12)


def _agg(x, mask, aggregation):
    if aggregation == "token-mean":
        return x[mask].sum() / mask.sum()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / x.shape[1]


@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_gft_entropy_bonus(tau):
    lp, _, adv, mask, g = _inputs(4)
    entropy = (2 * torch.rand(lp.shape, generator=g, dtype=torch.float64)).requires_grad_()
    out = gft_loss(lp, adv, mask, tau=tau, entropy=entropy, entropy_coeff=0.05)
    want = gft_reference(lp, adv, mask, tau=tau) - 0.05 * entropy[mask].sum() / mask.sum()
    _check(out.loss, want, lp, entropy)
    assert out.metrics["entropy"].item() == pytest.approx(float(entropy.detach()[mask].mean()))


def test_an_entropy_bonus_without_an_entropy_gradient_is_refused():
    lp, old, adv, mask, _ = _inputs(0)
    detached = torch.rand(lp.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="carries its gradient"):
        grpo_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.2, entropy=detached, entropy_coeff=0.01)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        gft_loss(lp, adv, mask, tau=0.5, entropy_coeff=0.01)


@pytest.mark.parametrize("fused", [True, False])
def test_scorer_entropy_carries_the_gradient_of_the_full_softmax(fused):
    model = tiny_lm(dtype=torch.float64)
    ex = random_examples(3, seed=2)
    from pipeline.model.batches import collate_padded

    batch = collate_padded(ex, range(3), PAD)
    scorer = TokenScorer(model, chunk_size=4, fused=fused)
    args = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                targets=batch.targets, loss_mask=batch.loss_mask)
    assert not scorer(**args)[1].requires_grad  # off: the detached diagnostic
    differentiable_entropy(scorer, True)
    _, entropy = scorer(**args)
    (got,) = torch.autograd.grad(entropy.sum(), model.lm_head.weight)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [R, L, V]
    logp = torch.log_softmax(logits.double(), -1)[batch.loss_mask]  # [M, V]
    want_h = -(logp.exp() * logp).sum(-1)
    assert_close(entropy, want_h, rtol=1e-10, atol=1e-10)
    (want,) = torch.autograd.grad(want_h.sum(), model.lm_head.weight)
    assert_close(got, want, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------------- the sampler correction


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_truncate", "token_mask", "sequence_mask"])
@pytest.mark.parametrize("floor", [None, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_sampler_correction_modes_match_trl(mode, floor, seed):
    g = torch.Generator().manual_seed(seed)
    lp = -3 * torch.rand(6, 5, generator=g, dtype=torch.float64)
    q = lp + 0.5 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=g) < 0.8
    mask[:, 0] = True
    level, kind = mode.split("_")
    out = importance_weights(lp, q, mask, mode=mode, cap=1.5, floor=floor)
    ref = importance_weights_reference(lp, q, mask, level=level, cap=1.5, floor=floor, masking=kind == "mask")
    assert_close(out.weights, ref, rtol=1e-13, atol=0)
    if kind == "mask":
        values = ref[mask] if level == "token" else ref[:, 0]
        assert (values == 0).any()  # the test exercises the masking
        got = out.metrics["sampling/importance_sampling_ratio/frac_masked"].item()
        assert got == pytest.approx(float((values == 0).double().mean()))


def test_sampler_correction_hand_case():
    # log(p / q) = [log 4, log 0.25] in one sequence: tokens [4, 0.25], sequence 1. Bounds [0.5, 3]:
    # token_truncate [3, 0.5]; token_mask [0, 0]; sequence modes keep 1 (inside).
    lp = torch.tensor([[math.log(4.0), math.log(0.25)]], dtype=torch.float64)
    q, mask = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool)
    w = {m: importance_weights(lp, q, mask, mode=m, cap=3.0, floor=0.5).weights.tolist()[0]
         for m in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")}
    assert w == {"token_truncate": [3.0, 0.5], "token_mask": [0.0, 0.0],
                 "sequence_truncate": pytest.approx([1.0, 1.0]), "sequence_mask": pytest.approx([1.0, 1.0])}


# --------------------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("singleton", ["reward", "zero"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_scaled_advantages_match_trl(baseline, singleton, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [f"p{k}" for k in range(5) for _ in range(4)] + ["lone"]
    r = torch.randint(0, 3, (len(ids),), generator=g).double().requires_grad_()
    out = group_advantages(r, ids, scale="batch", baseline=baseline, eps=1e-4, singleton=singleton)
    ref = torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in advantages_reference(
        list(r.unbind()), ids, scale="batch", baseline=baseline, eps=1e-4, singleton=singleton)])
    assert_close(out.advantages, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(len(ids), generator=g, dtype=torch.float64)
    got, want = _grad((out.advantages * w).sum(), r)[0], _grad((ref * w).sum(), r)[0]
    ok = torch.isfinite(want)
    assert_close(got[ok], want[ok], rtol=1e-10, atol=1e-10)
    std = float(r.detach().std())
    group0 = r.detach()[:4]
    assert out.advantages[0].item() == pytest.approx(
        float(group0[0] - (group0.mean() if baseline == "mean" else group0[1:].mean())) / (std + 1e-4))


def test_one_scored_completion_gets_zero_advantage_like_trl():
    # TRL: nanmean([1]) = 1, nanstd([1]) = NaN -> A = NaN -> 0 (scale group), (1 - 1) = 0 (none), 0 (batch).
    rewards = torch.tensor([1.0, math.nan, math.nan, math.nan, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    ids = ["a"] * 4 + ["b"] * 4
    for scale in ("group", "none", "batch"):
        out = masked_group_advantages(rewards, ids, scale=scale, singleton="zero").advantages
        assert out[:4].tolist() == [0.0] * 4, scale
        assert out[4].item() > 0 and out[5].item() < 0
    verl = masked_group_advantages(rewards, ids, singleton="reward").advantages
    assert verl[0].item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_normalize_then_sum_matches_trl(seed):
    g = torch.Generator().manual_seed(seed)
    ids = [f"p{k}" for k in range(4) for _ in range(4)]
    values = torch.randint(0, 4, (16, 3), generator=g).double()
    missing = torch.rand(16, 3, generator=g) < 0.3
    missing[0] = True  # an unscorable row
    missing[4:8, 1] = True
    missing[5, 1] = False  # reward 1 applies to one row of group p1: it contributes nothing there
    per_func = torch.where(missing, torch.full_like(values, math.nan), values)
    weights = [1.0, 0.5, 2.0]
    out = normalize_then_sum(per_func, ids, weights, eps=1e-4)
    rows = [[None if math.isnan(v) else v for v in row] for row in per_func.tolist()]
    assert out.advantages.tolist() == pytest.approx(normalize_then_sum_reference(rows, ids, weights, 1e-4),
                                                    rel=1e-12, abs=1e-12)
    assert out.advantages[0].item() == 0.0


def test_normalize_then_sum_differs_from_sum_then_normalize():
    # The worked example of TRL's docs: correctness [1, 0, 1, 0] and a length penalty [-120, -100, -60, -80].
    per_func = torch.tensor([[1.0, -120.0], [0.0, -100.0], [1.0, -60.0], [0.0, -80.0]], dtype=torch.float64)
    nts = normalize_then_sum(per_func, ["q"] * 4, eps=1e-4).advantages
    stn = group_advantages(per_func.sum(-1), ["q"] * 4, eps=1e-4).advantages
    assert stn.tolist() == pytest.approx([-1.1423, -0.4066, 1.1809, 0.3679], abs=1e-3)  # the length term dominates
    assert nts[0].item() > stn[0].item()  # correctness counts as much as length after per-reward normalization


# --------------------------------------------------------------------------------------------- configuration


def test_config_refuses_inconsistent_options_and_names_the_renamed_ones():
    with pytest.raises(ValueError, match="dual_clip = 1.2 must exceed 1 \\+ eps_high"):
        GRPOConfig(dual_clip=1.2)
    with pytest.raises(ValueError, match="kl_clamp applies to kl_estimator 'k3'"):
        GRPOConfig(kl_estimator="k2", kl_clamp=10.0)
    with pytest.raises(ValueError, match="normalize_then_sum"):
        GRPOConfig(multi_objective_aggregation="normalize_then_sum", advantage_scale="none")
    with pytest.raises(ValueError, match="sampler_correction_min"):
        GRPOConfig(sampler_correction_min=1.5)  # a lower bound lies in [0, 1], the upper one at 1 or above
    with pytest.raises(ValueError, match="renamed.*sampler_correction.*importance_sampling_level"):
        GRPOConfig.model_validate({"importance_sampling": "sequence"})
    with pytest.raises(ValueError, match="'constant' is now 'dr_grpo'"):
        GRPOConfig.model_validate({"aggregation": "constant"})
    cfg = GRPOConfig()
    assert (cfg.singleton_advantage, cfg.sampler_correction, cfg.entropy_coeff, cfg.dual_clip) == (
        "zero", "token_truncate", 0.0, None)
    assert GFTConfig().entropy_coeff == 0.0


# --------------------------------------------------------------------------------------------- the round


@pytest.mark.parametrize("coeff", [0.0, 0.5])
def test_a_grpo_round_with_an_entropy_bonus_steps_along_its_gradient(coeff):
    # On-policy first step, token-mean: grad of -(sum_k A_k sum_t lp_kt + c sum_kt H_kt) / tokens, H from full logits.
    import copy

    from pipeline.config import TrainConfig
    from tests.integration.test_grpo import _on_policy_round, _run_round

    model = tiny_lm(seed=1)
    prompt_ids, table = _on_policy_round(model)
    cfg = GRPOConfig(num_generations=4, entropy_coeff=coeff, sampler_correction="none", max_response_tokens=8,
                     train=TrainConfig(lr=1e-3, max_grad_norm=None, micro_batch_size=5))
    reference = copy.deepcopy(model)
    _, _, history, grads = _run_round(model, prompt_ids, table, cfg)
    terms, tokens = [], 0
    for g, ids, a in zip(table["group_index"], table["token_ids"], table["advantage"]):
        x = torch.tensor([prompt_ids[g] + list(ids)])
        logp = torch.log_softmax(reference(x).logits[0, :-1].double(), -1)[-len(ids):]  # [T, V]
        lp = logp.gather(-1, x[0, -len(ids):, None]).squeeze(-1)
        terms.append(-a * lp.sum() - coeff * (-(logp.exp() * logp).sum(-1)).sum())
        tokens += len(ids)
    (sum(terms) / tokens).backward()
    for name, p in reference.named_parameters():
        assert_close(grads[0][name], p.grad.double(), rtol=2e-4, atol=1e-7, msg=name)
    assert history[0]["entropy"] > 0
