"""Group advantages (GAL, docs/design.md section 1.3): one scalar per response, from the rewards of its group.

    A_k = (R_k - b_k) / (s_G + eps)

with b_k the group mean (GRPO/GFT) or the mean of the other members (leave-one-out, RLOO), and s_G the
group's standard deviation with Bessel's correction (N - 1), or 1 with `scale="none"` (Dr.GRPO).
A singleton group has b = 0 and s = 1, so A = R. Vectorized over flat arrays with index_add, in the
rewards' dtype, and differentiable in the rewards.

Several rewards combine as TRL's reward_funcs + reward_weights: R_i = sum_f w_f R_{i,f} over the functions f
that apply to row i (a None reward is NaN and skipped: nansum). A row where no function applies has R = NaN:
`masked_group_advantages` leaves it out of its group's mean and std and gives it A = 0 (current TRL), instead
of nansum's 0, which would bias the baseline and hand the row a spurious advantage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["AdvantageOutput", "group_advantages", "CombinedRewards", "combine_rewards", "masked_group_advantages"]


@dataclass(frozen=True)
class AdvantageOutput:
    """Advantages [N] aligned with the rewards, and summary statistics of the batch."""

    advantages: Tensor
    stats: dict[str, float]


def _group_index(group_ids: Sequence | np.ndarray | Tensor, n: int) -> tuple[Tensor, list]:
    """Dense group index [N] in first-seen order, and the caller's id of each group."""
    ids = group_ids.tolist() if isinstance(group_ids, (Tensor, np.ndarray)) else list(group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} entries but rewards has {n}")
    codes: dict = {}
    index = [codes.setdefault(g, len(codes)) for g in ids]
    return torch.tensor(index, dtype=torch.long), list(codes)


def _check_finite(rewards: Tensor, index: Tensor, names: list) -> None:
    bad = ~torch.isfinite(rewards.detach())
    if bad.any():
        groups = sorted({str(names[g]) for g in index[bad.cpu()].tolist()})
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"non-finite reward in group(s) {groups[:10]} at row(s) {rows[:10]}")


def group_advantages(
    rewards: Tensor | Sequence[float], group_ids: Sequence | np.ndarray | Tensor, *,
    scale: Literal["group", "none"] = "group", baseline: Literal["mean", "leave_one_out"] = "mean",
    eps: float = 1e-6,
) -> AdvantageOutput:
    """Group-relative advantages for flat rewards [N] and group ids [N] (any hashable ids)."""
    r = torch.as_tensor(rewards, dtype=torch.float64) if not isinstance(rewards, Tensor) else rewards
    if r.dim() != 1:
        raise ValueError(f"rewards must be flat [N], got shape {tuple(r.shape)}")
    index, names = _group_index(group_ids, r.shape[0])
    _check_finite(r, index, names)
    index = index.to(r.device)
    g = len(names)
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, index, torch.ones_like(r))  # [G]
    total = torch.zeros(g, dtype=r.dtype, device=r.device).index_add(0, index, r)  # [G]
    mean = total / count  # [G]
    sq = torch.zeros(g, dtype=r.dtype, device=r.device).index_add(0, index, (r - mean[index]) ** 2)  # [G]
    single = count < 2  # [G]
    var = sq / (count - 1).clamp_min(1)  # [G], Bessel's correction
    # sqrt only where var > 0: sqrt'(0) is inf, and inf * 0 would put NaN in the rewards' gradient
    safe = torch.where(var > 0, var, torch.ones_like(var)).sqrt()
    std = torch.where(single, torch.ones_like(var), torch.where(var > 0, safe, torch.zeros_like(var)))  # [G]
    if baseline == "mean":
        base = torch.where(single, torch.zeros_like(mean), mean)[index]  # [N]
    elif baseline == "leave_one_out":
        base = torch.where(single[index], torch.zeros_like(r), (total[index] - r) / (count[index] - 1).clamp_min(1))
    else:
        raise ValueError(f"unknown baseline {baseline!r}; expected 'mean' or 'leave_one_out'")
    if scale == "group":
        adv = (r - base) / (std[index] + eps)  # [N]
    elif scale == "none":
        adv = r - base  # [N]
    else:
        raise ValueError(f"unknown scale {scale!r}; expected 'group' or 'none'")
    return AdvantageOutput(advantages=adv, stats=_stats(r, adv, std, single))


def _stats(r: Tensor, adv: Tensor, std: Tensor, single: Tensor) -> dict[str, float]:
    """Zero-std groups (two or more members, all rewards equal) give no gradient: their fraction of all groups."""
    zero_std = (~single) & (std == 0)
    n = r.numel()
    return {
        "num_groups": float(std.numel()),
        "frac_reward_zero_std": float(zero_std.double().mean()) if std.numel() else 0.0,
        "frac_singleton_groups": float(single.double().mean()) if std.numel() else 0.0,
        "reward_mean": float(r.detach().mean()) if n else 0.0,
        "reward_std": float(r.detach().std()) if n > 1 else 0.0,
        "advantage_mean": float(adv.detach().mean()) if n else 0.0,
        "advantage_std": float(adv.detach().std()) if n > 1 else 0.0,
    }


@dataclass(frozen=True)
class CombinedRewards:
    """One reward per row [N] (NaN where no function applies) and which rows some function applies to [N]."""

    rewards: Tensor
    applicable: Tensor


def combine_rewards(per_func: Tensor, weights: Tensor | Sequence[float] | None = None) -> CombinedRewards:
    """Weighted sum over the applicable rewards: per_func [N, F] with NaN for None, weights [F] (None: all 1)."""
    if per_func.dim() != 2:
        raise ValueError(f"per_func must be [rows, rewards], got shape {tuple(per_func.shape)}")
    w = torch.ones(per_func.shape[1], dtype=per_func.dtype) if weights is None else torch.as_tensor(
        weights, dtype=per_func.dtype)
    if w.shape != per_func.shape[1:]:
        raise ValueError(f"{w.numel()} weights for {per_func.shape[1]} rewards")
    inf = torch.isinf(per_func)
    if inf.any():
        row, col = inf.nonzero()[0].tolist()
        raise ValueError(f"reward {col} is infinite at row {row}")
    applies = ~torch.isnan(per_func)  # [N, F]
    total = torch.where(applies, per_func * w, torch.zeros_like(per_func)).sum(-1)  # [N]
    applicable = applies.any(-1)  # [N]
    return CombinedRewards(rewards=torch.where(applicable, total, torch.full_like(total, float("nan"))),
                           applicable=applicable)


def masked_group_advantages(rewards: Tensor, group_ids: Sequence, *, scale: Literal["group", "none"] = "group",
                            baseline: Literal["mean", "leave_one_out"] = "mean", eps: float = 1e-6) -> AdvantageOutput:
    """`group_advantages` over the rows with a finite reward; rows with a NaN reward get A = 0."""
    ids = list(group_ids)
    if len(ids) != rewards.shape[0]:
        raise ValueError(f"group_ids has {len(ids)} entries but rewards has {rewards.shape[0]}")
    keep = ~torch.isnan(rewards)  # [N]
    kept = keep.nonzero().flatten()
    inner = group_advantages(rewards[kept], [ids[i] for i in kept.tolist()], scale=scale, baseline=baseline, eps=eps)
    adv = torch.zeros_like(rewards).index_put((kept,), inner.advantages)  # [N]
    stats = dict(inner.stats, frac_reward_missing=float((~keep).double().mean()) if keep.numel() else 0.0)
    return AdvantageOutput(advantages=adv, stats=stats)
