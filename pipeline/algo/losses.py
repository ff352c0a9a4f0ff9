"""The loss family of GFT (arXiv 2604.14258) and its baselines: pure functions of tensors.

GFT (Group Fine-Tuning), per response token t of group member k with group advantage A_k:

    p_{k,t} = pi_theta(y_{k,t} | x, y_{k,<t})                    (current policy, temperature 1, or T: see 5.)
    C(p)    = sg(p)  if p <= tau  else 1                          (Dynamic Coefficient Rectification)
    l_{k,t} = -A_k * C(p_{k,t}) * log p_{k,t}  -  c_H * H_{k,t}   (c_H: optional entropy bonus, 0 by default)
    L       = sum_{k,t} m_{k,t} * l_{k,t} / Z                     (Z = response tokens of the optimizer step)

L is the default aggregation (token-mean); GFT takes every mode of `AGGREGATIONS` below (GFTConfig.aggregation,
the released code's `loss_agg_mode`) through the same `_aggregate` and `step_normalizer` as GRPO.

The baselines are the same function (docs/design.md section 1.7):
    SFT                = expert-only groups, A = 1, tau = 0       -> `sft_loss`
    DFT                = A = 1, C = sg(p) everywhere (tau > 1)    -> `dft_loss`
    GFT without DCR    = tau = 0                                  -> `gft_loss(..., tau=0.0)`
GRPO is the clipped importance-ratio surrogate with an optional KL to a reference -> `grpo_loss`:

    r_{k,t}  = exp(log p_{k,t} - log p_old_{k,t})                 (ratio_level "token")
    r_{k,t}  = exp(mean_t (log p_{k,t} - log p_old_{k,t}))        (ratio_level "sequence": GSPO, TRL
                                                                   importance_sampling_level="sequence")
    s_{k,t}  = -min(r A_k, clip(r, 1 - eps_low, 1 + eps_high) A_k)
    s_{k,t}  = min(s_{k,t}, -c A_k)  where A_k < 0                (dual clip c: verl clip_ratio_c, TRL delta)
    l_{k,t}  = s_{k,t} * w_{k,t} + beta * KL_{k,t} - c_H * H_{k,t}
with KL one of verl's `kl_penalty` estimators (`kl_penalty`; d = log p_ref - log p): k1 = -d, abs = |d|,
k2 = d^2 / 2, k3 = exp(d) - d - 1 (TRL's, and verl's low_var_kl, which clamps it to [-10, 10]). The per-token
loss is aggregated by verl's loss_agg_mode (`AGGREGATIONS`), over the optimizer step's global normalizer:

    token-mean              sum / tokens                                   (DAPO; TRL "dapo", "bnpo")
    seq-mean-token-mean     mean over non-empty sequences of token means   (GRPO 2024; TRL "grpo")
    seq-mean-token-sum      sum / sequences
    seq-mean-token-sum-norm sum / T   (T = max_response_tokens: a constant, not divided by the sequences)
    dr_grpo                 sum / (sequences * T)                          (Dr.GRPO; TRL "dr_grpo")

w is the importance weight of the sampler/trainer mismatch (`pipeline.algo.sampler.importance_weights`, TRL's
vllm_importance_sampling_mode), rho = exp(log p_old - log q) per token or exp(sum_t ...) per sequence:

    *_truncate: w = clamp(rho, floor, cap)              *_mask: w = rho if floor <= rho <= cap else 0

It multiplies the surrogate only, not the KL term (TRL's order). Expert and teacher tokens have no sampler
log-probs (no q), so GFT, which has no ratio, never applies it: they are excluded by construction.

Deliberate deviations from the paper and its released code:
1. The paper's Eq. 5 rectifies when p < tau; we rectify when p <= tau, as the released code does
   (`prob > tao` keeps the coefficient 1). The two differ only on a set of measure zero.
2. The released code averages tokens per micro-batch (verl `token-mean`), so its gradient depends on the
   micro-batch split. We divide by `normalizer`, the response-token count of the whole optimizer step
   across micro-batches and ranks, so the gradient does not depend on how the step is split. The same holds
   for every aggregation: seq-mean-token-sum-norm divides the step's sum by T once (verl divides each
   micro-batch's sum by T and averages the micro-batches).
3. The entropy bonus is subtracted per token before aggregation, so it is aggregated like the policy loss
   (verl aggregates it separately with the same mode: the same number), and it is subtracted after the
   importance weight (verl: outside the policy loss, likewise unweighted).
4. Dual clip is verl's form; TRL's delta caps the unclipped ratio instead, which is the same loss and
   gradient whenever delta > 1 + eps_high (GRPOConfig requires that).
5. Scoring at the sampling temperature (`score_at_temperature`, off by default: p at temperature 1) takes
   p = softmax(logits / T) for log p, for C(p) and for H. The released code takes log p at T but C(p) from the
   raw logits (T = 1); we take both from one distribution, as the paper's equation states them for one p. The
   two agree at T = 1, the run script's setting.
6. With a sequence-level ratio (GSPO), `clip_ratio/*` are fractions of sequences, as TRL logs them (the ratio
   is one number per sequence); with the token ratio they are fractions of tokens.

Token log-probs come from `pipeline.model.logprobs` (chunked and fused over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "LossOutput",
    "gft_loss",
    "sft_loss",
    "dft_loss",
    "grpo_loss",
    "kl_penalty",
    "policy_ratio",
    "clipped_surrogate",
    "AGGREGATIONS",
    "GFT_AGGREGATIONS",
    "step_normalizer",
]

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "dr_grpo"]
AGGREGATIONS: tuple[str, ...] = Aggregation.__args__
GFT_AGGREGATIONS: tuple[str, ...] = AGGREGATIONS[:4]
"""verl's four loss_agg_mode values, the ones the released GFT code takes (dr_grpo is TRL's and GRPO-only)."""
KLEstimator = Literal["k1", "k2", "abs", "k3"]
RatioLevel = Literal["token", "sequence"]


@dataclass(frozen=True)
class LossOutput:
    """A scalar loss to backpropagate and detached scalar metrics: token means over the masked tokens, except
    those named in `weights`, whose weight when batches combine is given there (e.g. their sequence count)."""

    loss: Tensor
    metrics: dict[str, Tensor]
    weights: dict[str, Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Shared validation and aggregation
# ---------------------------------------------------------------------------------------------------------


def _expand_advantages(advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token advantages: [N] (one per sequence) broadcast over T, or already the logprobs' shape."""
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logprobs shape {tuple(logprobs.shape)}")
    if advantages.shape == logprobs.shape:
        return advantages
    if logprobs.dim() == 2 and advantages.shape == logprobs.shape[:1]:
        return advantages.unsqueeze(-1).expand_as(logprobs)  # [N, T]
    raise ValueError(
        f"advantages shape {tuple(advantages.shape)} matches neither logprobs shape {tuple(logprobs.shape)} "
        f"nor one advantage per sequence {tuple(logprobs.shape[:1])}"
    )


def _token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Detached mean of x over masked tokens (0 when the mask is empty)."""
    m = mask.bool()
    return (torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp_min(1)).detach()


def _token_sum_over(per_token: Tensor, mask: Tensor, normalizer: float | Tensor | None) -> Tensor:
    # where(), not a product: a masked position may hold -inf or NaN (padding) and must add nothing.
    total = torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum()
    denom = mask.sum().clamp_min(1) if normalizer is None else normalizer
    return total / denom


# ---------------------------------------------------------------------------------------------------------
# GFT and its special cases
# ---------------------------------------------------------------------------------------------------------


def gft_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, tau: float,
    normalizer: float | Tensor | None = None, entropy: Tensor | None = None, entropy_coeff: float = 0.0,
    aggregation: Aggregation = "token-mean", seq_index: Tensor | None = None,
) -> LossOutput:
    """GFT loss: -A * C(p) * log p - entropy_coeff * H per token, aggregated by `aggregation` (verl's
    loss_agg_mode, as in `grpo_loss`) over `normalizer` (the local denominator if None: token-mean divides by the
    local token count).

    Args:
        logprobs: [N, T] (or flat [M]) log p of the response tokens under the current policy.
        advantages: [N] per sequence or the shape of logprobs (per token).
        mask: shape of logprobs; 1 for response tokens that count.
        tau: DCR threshold; tokens with p <= tau get C = sg(p), others C = 1.
        normalizer: global response-token count of the optimizer step (across micro-batches and ranks).
        entropy: optional per-token entropy, shape of logprobs: a metric, and the bonus when entropy_coeff > 0
            (it must then carry its gradient).
        seq_index: flat inputs only: the sequence of every token (seq-mean-token-mean).
    """
    adv = _expand_advantages(advantages, logprobs, mask)
    probs = logprobs.detach().exp()  # [N, T]
    rectified = probs <= tau  # [N, T] bool
    coef = torch.where(rectified, probs, torch.ones_like(probs))  # [N, T], detached by construction
    metrics = {
        "rectified_frac": _token_mean(rectified.to(logprobs.dtype), mask),
        "coef_mean": _token_mean(coef, mask),
        "logprob_mean": _token_mean(logprobs.detach(), mask),
        "advantage_mean": _token_mean(adv.detach().to(logprobs.dtype), mask),
    }
    per_token = _entropy_bonus(-adv * coef * logprobs, entropy, entropy_coeff, logprobs, mask, metrics)  # [N, T]
    return LossOutput(loss=_aggregate(per_token, mask, aggregation, normalizer, seq_index), metrics=metrics)


def sft_loss(logprobs: Tensor, mask: Tensor, *, normalizer: float | Tensor | None = None,
             entropy: Tensor | None = None) -> LossOutput:
    """Plain SFT, -log p per token: GFT with A = 1 and tau = 0 (no token is rectified)."""
    return gft_loss(logprobs, torch.ones_like(logprobs), mask, tau=0.0, normalizer=normalizer, entropy=entropy)


def dft_loss(logprobs: Tensor, mask: Tensor, *, normalizer: float | Tensor | None = None,
             entropy: Tensor | None = None) -> LossOutput:
    """DFT (arXiv 2508.05629), -sg(p) * log p per token: GFT with A = 1 and every token rectified."""
    return gft_loss(logprobs, torch.ones_like(logprobs), mask, tau=float("inf"), normalizer=normalizer,
                    entropy=entropy)


# ---------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------


def _sequence_ids(per_token: Tensor, seq_index: Tensor | None, what: str) -> Tensor:
    """The sequence of every token: the row of [N, T] inputs, or `seq_index` for flat [M] inputs."""
    if per_token.dim() == 2:
        return torch.arange(per_token.shape[0], device=per_token.device)[:, None].expand_as(per_token)  # [N, T]
    if per_token.dim() != 1:
        raise ValueError(f"{what} needs [N, T] or flat [M] inputs, got shape {tuple(per_token.shape)}")
    if seq_index is None or seq_index.shape != per_token.shape:
        got = None if seq_index is None else tuple(seq_index.shape)
        raise ValueError(f"{what} on flat tokens {tuple(per_token.shape)} needs seq_index of the same shape, got {got}")
    return seq_index


def _per_sequence(per_token: Tensor, mask: Tensor, seq_index: Tensor | None, what: str) -> tuple[Tensor, Tensor,
                                                                                                    Tensor]:
    """(masked sums [S], masked token counts [S], each token's sequence [same shape as per_token] as 0..S-1)."""
    ids = _sequence_ids(per_token, seq_index, what)
    _, inverse = torch.unique(ids.reshape(-1), return_inverse=True)  # [M]
    s = int(inverse.max()) + 1 if inverse.numel() else 0
    m = mask.reshape(-1).bool()
    values = torch.where(m, per_token.reshape(-1), torch.zeros_like(per_token.reshape(-1)))  # [M]
    sums = values.new_zeros(s).index_add(0, inverse, values)  # [S]
    counts = values.new_zeros(s).index_add(0, inverse, m.to(values.dtype))  # [S]
    return sums, counts, inverse.reshape(per_token.shape)


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: Aggregation,
               normalizer: float | Tensor | None, seq_index: Tensor | None = None) -> Tensor:
    """verl's loss_agg_mode (module docstring). `normalizer` replaces the local denominator (tokens, sequences,
    T or sequences x T) with the optimizer step's global one. Flat [M] inputs name each token's sequence in
    `seq_index` for seq-mean-token-mean and need an explicit normalizer for the modes that divide by T or by
    the sequence count."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
    if aggregation == "seq-mean-token-mean":
        sums, counts, _ = _per_sequence(per_token, mask, seq_index, "aggregation 'seq-mean-token-mean'")
        present = counts > 0  # [S]: fully masked rows are left out, as verl does
        per_seq = torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums))  # [S]
        return per_seq.sum() / (present.sum().clamp_min(1) if normalizer is None else normalizer)
    if normalizer is None:
        normalizer = _local_normalizer(aggregation, per_token, mask)
    return _token_sum_over(per_token, mask, normalizer)


def _local_normalizer(aggregation: Aggregation, per_token: Tensor, mask: Tensor) -> Tensor | int:
    """The denominator of one [N, T] batch: tokens, non-empty sequences, T, or N x T."""
    if aggregation == "token-mean":
        return mask.sum().clamp_min(1)
    if per_token.dim() != 2:
        raise ValueError(f"aggregation {aggregation!r} on flat [M] tokens needs an explicit normalizer "
                         f"(sequences, T or sequences x T of the step)")
    if aggregation == "seq-mean-token-sum":
        return mask.bool().any(-1).sum().clamp_min(1)
    if aggregation == "seq-mean-token-sum-norm":
        return per_token.shape[1]
    return per_token.numel()  # dr_grpo


def step_normalizer(aggregation: Aggregation, *, tokens: int, sequences: int,
                    max_response_tokens: int | None = None) -> int:
    """The global denominator of one optimizer step (all micro-batches, all processes) for `_aggregate`: its
    response tokens (token-mean), its sequences (seq-mean-token-mean, seq-mean-token-sum), T =
    max_response_tokens (seq-mean-token-sum-norm) or sequences x T (dr_grpo). Every micro-batch divides by it,
    so the sum of the micro-batch losses is the step's loss however the step is split."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
    if aggregation in ("seq-mean-token-sum-norm", "dr_grpo") and max_response_tokens is None:
        raise ValueError(f"aggregation {aggregation!r} needs max_response_tokens")
    return {"token-mean": tokens, "seq-mean-token-mean": sequences, "seq-mean-token-sum": sequences,
            "seq-mean-token-sum-norm": max_response_tokens,
            "dr_grpo": sequences * (max_response_tokens or 0)}[aggregation]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: KLEstimator = "k3",
               clamp: float | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (verl `kl_penalty`).

    With d = log pi_ref - log pi: k1 = -d (verl "kl"); abs = |d|; k2 = d^2 / 2 (verl "mse"); k3 = exp(d) - d - 1
    (verl "low_var_kl", TRL's only estimator). `clamp` (k3 only; verl uses 10) clamps d to [-20, 20] and k3 to
    [-clamp, clamp] as verl's low_var_kl does: no gradient flows where a clamp is active."""
    delta = ref_logprobs.detach() - logprobs  # [N, T]
    if clamp is not None and estimator != "k3":
        raise ValueError(f"kl clamp {clamp} applies to the k3 (low_var_kl) estimator only, not {estimator!r}")
    if estimator == "k1":
        return -delta
    if estimator == "abs":
        return delta.abs()
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator != "k3":
        raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2, abs or k3")
    if clamp is None:
        return torch.exp(delta) - delta - 1.0
    delta = delta.clamp(-20.0, 20.0)
    return (torch.exp(delta) - delta - 1.0).clamp(-clamp, clamp)


def policy_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, *, level: RatioLevel = "token",
                 seq_index: Tensor | None = None) -> Tensor:
    """pi / pi_old per token (r = exp(lp - old)), or GSPO's per sequence (TRL importance_sampling_level=
    "sequence"): s_k = exp(mean over k's tokens of (lp - old)) on every token of k, with its gradient."""
    log_ratio = logprobs - old_logprobs.detach()  # [N, T]
    if level == "token":
        return torch.exp(log_ratio)
    if level != "sequence":
        raise ValueError(f"unknown ratio level {level!r}; expected 'token' or 'sequence'")
    sums, counts, inverse = _per_sequence(log_ratio, mask, seq_index, "ratio level 'sequence'")
    return torch.exp((sums / counts.clamp_min(1))[inverse])  # [N, T], one value per sequence


def clipped_surrogate(ratio: Tensor, adv: Tensor, *, eps_low: float, eps_high: float,
                      dual_clip: float | None = None) -> Tensor:
    """Per-token -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); with `dual_clip` c, tokens with A < 0 are
    bounded by -c A (verl clip_ratio_c; the same as TRL's delta when c > 1 + eps_high)."""
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    loss = torch.maximum(-adv * ratio, -adv * clipped)  # [N, T]
    if dual_clip is None:
        return loss
    return torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)


def grpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    eps_low: float, eps_high: float, dual_clip: float | None = None, ratio_level: RatioLevel = "token",
    beta: float = 0.0, ref_logprobs: Tensor | None = None, kl_estimator: KLEstimator = "k3",
    kl_clamp: float | None = None, entropy_coeff: float = 0.0, aggregation: Aggregation = "token-mean",
    normalizer: float | Tensor | None = None, is_weights: Tensor | None = None, seq_index: Tensor | None = None,
    entropy: Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate * w + beta * KL - entropy_coeff * H per token, aggregated (module docstring).

    Args:
        logprobs, old_logprobs, mask: [N, T] or flat [M]; the ratio is `policy_ratio` at `ratio_level`.
        advantages: [N] or the shape of logprobs.
        ref_logprobs: log-probs of the frozen reference, shape of logprobs, required when beta > 0; the KL is
            `kl_penalty(estimator=kl_estimator, clamp=kl_clamp)`.
        is_weights: optional importance weights w (shape of logprobs, detached) on the surrogate only.
        seq_index: flat inputs only: the sequence of every token (seq-mean-token-mean, sequence ratio).
        entropy: per-token entropy, shape of logprobs: a metric, and the bonus when entropy_coeff > 0 (it must
            then carry its gradient).
    """
    _check_same_shape("old_logprobs", old_logprobs, logprobs)
    adv = _expand_advantages(advantages, logprobs, mask)
    ratio = policy_ratio(logprobs, old_logprobs, mask, level=ratio_level, seq_index=seq_index)  # [N, T]
    per_token = clipped_surrogate(ratio, adv, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)  # [N, T]
    metrics, weights = _clip_metrics(ratio.detach(), adv.detach(), mask, eps_low, eps_high, dual_clip,
                                     per_sequence=ratio_level == "sequence", seq_index=seq_index)
    if is_weights is not None:
        _check_same_shape("is_weights", is_weights, logprobs)
        per_token = per_token * is_weights.detach()
    if beta != 0.0:
        if ref_logprobs is None or ref_logprobs.shape != logprobs.shape:
            got = None if ref_logprobs is None else tuple(ref_logprobs.shape)
            raise ValueError(f"beta={beta} needs ref_logprobs of shape {tuple(logprobs.shape)}, got {got}")
        kl = kl_penalty(logprobs, ref_logprobs, estimator=kl_estimator, clamp=kl_clamp)  # [N, T]
        per_token = per_token + beta * kl
        metrics["kl"] = _token_mean(kl.detach(), mask)
    per_token = _entropy_bonus(per_token, entropy, entropy_coeff, logprobs, mask, metrics)
    loss = _aggregate(per_token, mask, aggregation, normalizer, seq_index)
    return LossOutput(loss=loss, metrics=metrics, weights=weights)


def _entropy_bonus(per_token: Tensor, entropy: Tensor | None, coeff: float, logprobs: Tensor, mask: Tensor,
                   metrics: dict[str, Tensor]) -> Tensor:
    """per_token - coeff * H (verl entropy_coeff), and the `entropy` metric. A bonus needs H with its gradient:
    a detached H would add a constant and silently do nothing."""
    if entropy is None:
        if coeff != 0.0:
            raise ValueError(f"entropy_coeff={coeff} needs the per-token entropy")
        return per_token
    _check_same_shape("entropy", entropy, logprobs)
    metrics["entropy"] = _token_mean(entropy.detach(), mask)
    if coeff == 0.0:
        return per_token
    if logprobs.requires_grad and not entropy.requires_grad:
        raise ValueError(f"entropy_coeff={coeff} needs an entropy that carries its gradient (the scorer's "
                         f"differentiable entropy); a detached one would change nothing")
    return per_token - coeff * entropy


def _check_same_shape(name: str, x: Tensor, like: Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match logprobs shape {tuple(like.shape)}")


def _clip_metrics(ratio: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float,
                  dual_clip: float | None, *, per_sequence: bool = False,
                  seq_index: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """TRL/verl clip ratios: low = r < 1 - eps_low with A < 0, high = r > 1 + eps_high with A > 0; verl's
    pg_clipfrac_lower = r > c with A < 0 (the dual clip is active). Token means; with `per_sequence` (GSPO's
    sequence ratio) `clip_ratio/*` are means over the non-empty sequences, as TRL's `masked_batch_mean` takes
    them from the [B, 1] ratio. Returns (metrics, the weights of the sequence means: their sequence count)."""
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    f = ratio.dtype
    flags = {"clip_ratio/low_mean": low.to(f), "clip_ratio/high_mean": high.to(f),
             "clip_ratio/region_mean": (low | high).to(f)}
    if per_sequence:
        out, weights = _sequence_means(flags, mask, seq_index)
    else:
        out, weights = {name: _token_mean(x, mask) for name, x in flags.items()}, {}
    out["ratio_mean"] = _token_mean(ratio, mask)
    if dual_clip is not None:
        out["pg_clipfrac_lower"] = _token_mean(((ratio > dual_clip) & (adv < 0)).to(f), mask)
    return out, weights


def _sequence_means(values: dict[str, Tensor], mask: Tensor,
                    seq_index: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached means over the non-empty sequences of each value's per-sequence token mean, and their weight
    (the non-empty sequence count, 0 when there is none) under every name."""
    out, weights = {}, {}
    for name, x in values.items():
        sums, counts, _ = _per_sequence(x, mask, seq_index, f"metric {name!r} per sequence")  # [S], [S]
        present = counts > 0  # [S]
        per_seq = torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums))  # [S]
        n = present.sum()
        out[name] = (per_seq.sum() / n.clamp_min(1)).detach()
        weights[name] = n.to(x.dtype)
    return out, weights
