"""The sampler/trainer mismatch: measured (`sampler_mismatch`) and corrected by truncated or masked importance
sampling (`importance_weights`, TRL's vllm_importance_sampling_mode; docs/design.md section 1.7): pure functions of
[N, T] log-probs of the same sampled tokens under the trainer (lp) and the engine that sampled them (q).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["ISMode", "ISWeights", "importance_weights", "sampler_mismatch"]

ISMode = Literal["none", "token_truncate", "sequence_truncate", "token_mask", "sequence_mask"]


def _check_same_shape(name: str, x: Tensor, like: Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match trainer_logprobs shape {tuple(like.shape)}")



@dataclass(frozen=True)
class ISWeights:
    """Importance weights [N, T] (1 where masked out) and their TRL-named statistics."""

    weights: Tensor
    metrics: dict[str, Tensor]


def importance_weights(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, mode: ISMode,
                       cap: float, floor: float | None = None) -> ISWeights:
    """Importance weights of the trainer's policy over the sampler's, from [N, T] log-probs (TRL's
    vllm_importance_sampling_mode with clip_max = cap and clip_min = floor).

    rho = exp(lp - q) per token (token_*) or exp(sum_t m (lp - q)) on every token of a sequence (sequence_*);
    *_truncate: w = clamp(rho, floor, cap); *_mask: w = rho inside [floor, cap], 0 outside (the token or the
    whole sequence drops out of the surrogate); none: w = 1. Statistics (min, mean, max, and the masked
    fraction for *_mask) are over tokens or sequences, after the bound, as TRL logs them.
    """
    _check_same_shape("sampler_logprobs", sampler_logprobs, trainer_logprobs)
    _check_same_shape("mask", mask, trainer_logprobs)
    if trainer_logprobs.dim() != 2:
        raise ValueError(f"importance_weights needs [N, T] inputs, got {tuple(trainer_logprobs.shape)}")
    if mode not in ISMode.__args__:
        raise ValueError(f"unknown importance sampling mode {mode!r}; expected one of {', '.join(ISMode.__args__)}")
    m = mask.bool()
    diff = torch.where(m, trainer_logprobs.detach() - sampler_logprobs.detach(), torch.zeros_like(trainer_logprobs))
    if mode == "none":
        w, values = torch.ones_like(diff), diff.new_ones(int(m.sum()))  # [N, T], [M]
    elif mode.startswith("sequence"):
        per_seq = _bounded(torch.exp(diff.sum(-1)), mode, cap, floor)  # [N]
        w, values = per_seq.unsqueeze(-1).expand_as(diff).clone(), per_seq[m.any(-1)]  # [N, T], [S]
    else:
        w = _bounded(torch.exp(diff), mode, cap, floor)  # [N, T]
        values = w[m]
    return ISWeights(weights=torch.where(m, w, torch.ones_like(w)), metrics=_is_metrics(values, mode))


def _bounded(rho: Tensor, mode: str, cap: float, floor: float | None) -> Tensor:
    low = -math.inf if floor is None else floor
    if mode.endswith("truncate"):
        return torch.clamp(rho, min=low, max=cap)
    return torch.where((rho < low) | (rho > cap), torch.zeros_like(rho), rho)


def _is_metrics(values: Tensor, mode: str) -> dict[str, Tensor]:
    name = "sampling/importance_sampling_ratio"
    empty = values.numel() == 0
    one = values.new_ones(())
    out = {f"{name}/min": one if empty else values.min(), f"{name}/mean": one if empty else values.mean(),
           f"{name}/max": one if empty else values.max()}
    if mode.endswith("mask"):
        out[f"{name}/frac_masked"] = values.new_zeros(()) if empty else (values == 0).to(values.dtype).mean()
    return out


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
