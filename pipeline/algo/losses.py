"""The loss family of GFT (arXiv 2604.14258) and its baselines: pure functions of tensors.

GFT (Group Fine-Tuning), per response token t of group member k with group advantage A_k:

    p_{k,t} = pi_theta(y_{k,t} | x, y_{k,<t})                    (current policy, temperature 1)
    C(p)    = sg(p)  if p <= tau  else 1                          (Dynamic Coefficient Rectification)
    l_{k,t} = -A_k * C(p_{k,t}) * log p_{k,t}
    L       = sum_{k,t} m_{k,t} * l_{k,t} / Z                     (Z = response tokens of the optimizer step)

The baselines are the same function (docs/design.md section 1.7):
    SFT                = expert-only groups, A = 1, tau = 0       -> `sft_loss`
    DFT                = A = 1, C = sg(p) everywhere (tau > 1)    -> `dft_loss`
    GFT without DCR    = tau = 0                                  -> `gft_loss(..., tau=0.0)`
GRPO is the clipped importance-ratio surrogate with an optional k3 KL to a reference -> `grpo_loss`:

    r_{k,t}  = exp(log p_{k,t} - log p_old_{k,t})
    l_{k,t}  = -min(r A_k, clip(r, 1 - eps_low, 1 + eps_high) A_k) * w_{k,t} + beta * k3_{k,t}
    k3_{k,t} = exp(log p_ref - log p) - (log p_ref - log p) - 1
aggregated as a token mean (DAPO), a mean of per-sequence token means (GRPO 2024) or sum / (N * T_max)
(Dr.GRPO). w is the truncated importance weight of the sampler/trainer mismatch (`importance_weights`):

    token:    w_{k,t} = min(exp(log p_old_{k,t} - log q_{k,t}), C)
    sequence: w_{k,t} = min(exp(sum_t (log p_old_{k,t} - log q_{k,t})), C)      (q: the sampler's log-probs)
It multiplies the surrogate only, not the KL term (TRL's order). Expert and teacher tokens have no sampler
log-probs (no q), so GFT, which has no ratio, never applies it: they are excluded by construction.

Deliberate deviations from the paper and its released code:
1. The paper's Eq. 5 rectifies when p < tau; we rectify when p <= tau, as the released code does
   (`prob > tao` keeps the coefficient 1). The two differ only on a set of measure zero.
2. The released code averages tokens per micro-batch (verl `token-mean`), so its gradient depends on the
   micro-batch split. We divide by `normalizer`, the response-token count of the whole optimizer step
   across micro-batches and ranks, so the gradient does not depend on how the step is split.
3. Token entropy is computed as a detached diagnostic; no loss here has an entropy bonus.

Token log-probs come from `pipeline.model.logprobs` (chunked and fused over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "LossOutput",
    "gft_loss",
    "sft_loss",
    "dft_loss",
    "grpo_loss",
    "ISWeights",
    "importance_weights",
    "sampler_mismatch",
]

Aggregation = Literal["token_mean", "sequence_mean", "constant"]


@dataclass(frozen=True)
class LossOutput:
    """A scalar loss to backpropagate and detached scalar metrics (token means over the masked tokens)."""

    loss: Tensor
    metrics: dict[str, Tensor]


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
    normalizer: float | Tensor | None = None, entropy: Tensor | None = None,
) -> LossOutput:
    """GFT loss: token sum of -A * C(p) * log p over `normalizer` tokens (the local token count if None).

    Args:
        logprobs: [N, T] (or flat [M]) log p of the response tokens under the current policy.
        advantages: [N] per sequence or the shape of logprobs (per token).
        mask: shape of logprobs; 1 for response tokens that count.
        tau: DCR threshold; tokens with p <= tau get C = sg(p), others C = 1.
        normalizer: global response-token count of the optimizer step (across micro-batches and ranks).
        entropy: optional per-token entropy, shape of logprobs, reported as a metric.
    """
    adv = _expand_advantages(advantages, logprobs, mask)
    probs = logprobs.detach().exp()  # [N, T]
    rectified = probs <= tau  # [N, T] bool
    coef = torch.where(rectified, probs, torch.ones_like(probs))  # [N, T], detached by construction
    per_token = -adv * coef * logprobs  # [N, T]
    loss = _token_sum_over(per_token, mask, normalizer)
    metrics = {
        "rectified_frac": _token_mean(rectified.to(logprobs.dtype), mask),
        "coef_mean": _token_mean(coef, mask),
        "logprob_mean": _token_mean(logprobs.detach(), mask),
        "advantage_mean": _token_mean(adv.detach().to(logprobs.dtype), mask),
    }
    if entropy is not None:
        metrics["entropy"] = _token_mean(entropy.detach(), mask)
    return LossOutput(loss=loss, metrics=metrics)


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


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: Aggregation,
               normalizer: float | Tensor | None, seq_index: Tensor | None = None) -> Tensor:
    """token_mean: sum / tokens; sequence_mean: mean over sequences of per-sequence token means; constant:
    sum / (sequences * T) (Dr.GRPO). `normalizer` replaces the local tokens, sequences or sequences * T of the
    respective rule with the optimizer step's global value. Flat [M] inputs name each token's sequence in
    `seq_index` for sequence_mean, and need an explicit normalizer for constant (T is not known)."""
    if aggregation == "token_mean":
        return _token_sum_over(per_token, mask, normalizer)
    if aggregation not in ("sequence_mean", "constant"):
        raise ValueError(f"unknown aggregation {aggregation!r}; expected token_mean, sequence_mean or constant")
    if per_token.dim() == 1:
        return _aggregate_flat(per_token, mask, aggregation, normalizer, seq_index)
    if per_token.dim() != 2:
        raise ValueError(f"aggregation {aggregation!r} needs [N, T] or flat [M] inputs, got shape "
                         f"{tuple(per_token.shape)}")
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))  # [N, T]
    if aggregation == "sequence_mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp_min(1)  # [N]
        return per_seq.sum() / (per_token.shape[0] if normalizer is None else normalizer)
    return masked.sum() / (per_token.numel() if normalizer is None else normalizer)


def _aggregate_flat(per_token: Tensor, mask: Tensor, aggregation: Aggregation,
                    normalizer: float | Tensor | None, seq_index: Tensor | None) -> Tensor:
    if aggregation == "constant":
        if normalizer is None:
            raise ValueError("aggregation 'constant' on flat [M] tokens needs normalizer = sequences * T_max")
        return _token_sum_over(per_token, mask, normalizer)
    if seq_index is None or seq_index.shape != per_token.shape:
        got = None if seq_index is None else tuple(seq_index.shape)
        raise ValueError(f"aggregation 'sequence_mean' on flat tokens {tuple(per_token.shape)} needs seq_index "
                         f"of the same shape, got {got}")
    ids, inverse = torch.unique(seq_index, return_inverse=True)  # [S], [M]
    m = mask.bool()
    masked = torch.where(m, per_token, torch.zeros_like(per_token))  # [M]
    sums = masked.new_zeros(ids.shape[0]).index_add(0, inverse, masked)  # [S]
    counts = masked.new_zeros(ids.shape[0]).index_add(0, inverse, m.to(masked.dtype))  # [S]
    per_seq = sums / counts.clamp_min(1)  # [S]
    return per_seq.sum() / (ids.shape[0] if normalizer is None else normalizer)


def grpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    eps_low: float, eps_high: float, beta: float = 0.0, ref_logprobs: Tensor | None = None,
    aggregation: Aggregation = "token_mean", normalizer: float | Tensor | None = None,
    is_weights: Tensor | None = None, seq_index: Tensor | None = None, entropy: Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) * w + beta * k3 KL, aggregated.

    Args:
        logprobs, old_logprobs, mask: [N, T] or flat [M]; r = exp(logprobs - old_logprobs).
        advantages: [N] or the shape of logprobs.
        ref_logprobs: log-probs of the frozen reference, shape of logprobs, required when beta > 0.
            k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, non-negative estimator).
        is_weights: optional importance weights w (shape of logprobs, detached) on the surrogate only.
        seq_index: flat inputs only: the sequence of every token (for sequence_mean).
        entropy: optional per-token entropy, shape of logprobs, reported as a metric.
    """
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs shape {tuple(old_logprobs.shape)} does not match logprobs shape "
                         f"{tuple(logprobs.shape)}")
    adv = _expand_advantages(advantages, logprobs, mask)
    ratio = torch.exp(logprobs - old_logprobs.detach())  # [N, T]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    per_token = torch.maximum(-adv * ratio, -adv * clipped)  # [N, T]
    metrics = _clip_metrics(ratio.detach(), adv.detach(), mask, eps_low, eps_high)
    if is_weights is not None:
        _check_same_shape("is_weights", is_weights, logprobs)
        per_token = per_token * is_weights.detach()
    if beta != 0.0:
        if ref_logprobs is None or ref_logprobs.shape != logprobs.shape:
            got = None if ref_logprobs is None else tuple(ref_logprobs.shape)
            raise ValueError(f"beta={beta} needs ref_logprobs of shape {tuple(logprobs.shape)}, got {got}")
        delta = ref_logprobs.detach() - logprobs  # [N, T]
        kl = torch.exp(delta) - delta - 1.0  # [N, T]
        per_token = per_token + beta * kl
        metrics["kl"] = _token_mean(kl.detach(), mask)
    if entropy is not None:
        metrics["entropy"] = _token_mean(entropy.detach(), mask)
    loss = _aggregate(per_token, mask, aggregation, normalizer, seq_index)
    return LossOutput(loss=loss, metrics=metrics)


def _check_same_shape(name: str, x: Tensor, like: Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match logprobs shape {tuple(like.shape)}")


def _clip_metrics(ratio: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float) -> dict[str, Tensor]:
    """TRL/verl clip ratios: low = r < 1 - eps_low with A < 0, high = r > 1 + eps_high with A > 0."""
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    f = ratio.dtype
    return {
        "clip_ratio/low_mean": _token_mean(low.to(f), mask),
        "clip_ratio/high_mean": _token_mean(high.to(f), mask),
        "clip_ratio/region_mean": _token_mean((low | high).to(f), mask),
        "ratio_mean": _token_mean(ratio, mask),
    }


# ---------------------------------------------------------------------------------------------------------
# The sampler/trainer mismatch: measured, and corrected by truncated importance sampling
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ISWeights:
    """Importance weights [N, T] (1 where masked out) and their TRL-named statistics."""

    weights: Tensor
    metrics: dict[str, Tensor]


def importance_weights(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *,
                       level: Literal["none", "token", "sequence"], cap: float) -> ISWeights:
    """Truncated importance weights of the trainer's policy over the sampler's, from [N, T] log-probs.

    token: w_{k,t} = min(exp(lp_{k,t} - q_{k,t}), cap); sequence: w_k = min(exp(sum_t m (lp - q)), cap) on every
    token of k; none: w = 1. Statistics (min, mean, max) are over tokens (token) or sequences (sequence).
    """
    _check_same_shape("sampler_logprobs", sampler_logprobs, trainer_logprobs)
    _check_same_shape("mask", mask, trainer_logprobs)
    if trainer_logprobs.dim() != 2:
        raise ValueError(f"importance_weights needs [N, T] inputs, got {tuple(trainer_logprobs.shape)}")
    m = mask.bool()
    diff = torch.where(m, trainer_logprobs.detach() - sampler_logprobs.detach(), torch.zeros_like(trainer_logprobs))
    if level == "token":
        w = torch.clamp(torch.exp(diff), max=cap)  # [N, T]
        values = w[m]
    elif level == "sequence":
        per_seq = torch.clamp(torch.exp(diff.sum(-1)), max=cap)  # [N]
        w = per_seq.unsqueeze(-1).expand_as(diff).clone()  # [N, T]
        values = per_seq[m.any(-1)]
    elif level == "none":
        w = torch.ones_like(diff)
        values = w[m]
    else:
        raise ValueError(f"unknown importance sampling level {level!r}; expected none, token or sequence")
    w = torch.where(m, w, torch.ones_like(w))
    empty = values.numel() == 0
    name = "sampling/importance_sampling_ratio"
    metrics = {f"{name}/min": values.min() if not empty else w.new_ones(()),
               f"{name}/mean": values.mean() if not empty else w.new_ones(()),
               f"{name}/max": values.max() if not empty else w.new_ones(())}
    return ISWeights(weights=w, metrics=metrics)


def sampler_mismatch(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The gap between the engine's and the trainer's log-probs of the same sampled tokens.

    sampling/sampling_logp_difference/{mean,max}: |lp - q| over tokens (TRL's names); sampling/kl_k3: the k3
    estimate of KL(sampler || trainer) per token, with log rho = lp - q: exp(log rho) - log rho - 1 (the tokens
    are the sampler's samples, so this is unbiased for that direction).
    """
    _check_same_shape("sampler_logprobs", sampler_logprobs, trainer_logprobs)
    m = mask.bool()
    log_rho = (trainer_logprobs.detach() - sampler_logprobs.detach())[m]  # [M]
    if log_rho.numel() == 0:
        zero = trainer_logprobs.new_zeros(())
        return {"sampling/sampling_logp_difference/mean": zero, "sampling/sampling_logp_difference/max": zero,
                "sampling/kl_k3": zero}
    return {"sampling/sampling_logp_difference/mean": log_rho.abs().mean(),
            "sampling/sampling_logp_difference/max": log_rho.abs().max(),
            "sampling/kl_k3": (torch.exp(log_rho) - log_rho - 1.0).mean()}
