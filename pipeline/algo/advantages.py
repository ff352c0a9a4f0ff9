"""Group advantages (GAL, docs/design.md section 1.3): one scalar per response, from the rewards of its group.

    A_k = (R_k - b_k) / (s_G + eps)

with b_k the group mean (GRPO/GFT) or the mean of the other members (leave-one-out, RLOO), and s_G the
group's standard deviation with Bessel's correction (N - 1) (`scale="group"`), the standard deviation of the
whole batch's rewards (`scale="batch"`, TRL scale_rewards="batch") or 1 (`scale="none"`, Dr.GRPO).
A singleton group (one member, or one member with a reward) gets A = R with `singleton="reward"` (b = 0,
s = 1: the verl/GFT fork's rule, which the GFT rounds keep) or A = 0 with `singleton="zero"` (TRL: the nanstd
of one value is NaN and its advantage becomes 0; the GRPO rounds' default). Vectorized over flat arrays with
index_add, in the rewards' dtype, and differentiable in the rewards.

Several rewards combine as TRL's reward_funcs + reward_weights, in one of TRL's two
multi_objective_aggregation orders:
- sum_then_normalize (`combine_rewards` then `masked_group_advantages`): R_i = sum_f w_f R_{i,f} over the
  functions f that apply to row i (a None reward is NaN and skipped: nansum). A row where no function applies
  has R = NaN: it is left out of its group's mean and std and gets A = 0 (current TRL), instead of nansum's 0,
  which would bias the baseline and hand the row a spurious advantage.
- normalize_then_sum (`normalize_then_sum`, GDPO): each function's rewards are normalized in their group
  first, (R_f - mean_f) / (std_f + eps) over the rows it applies to (a group where it applies to one row
  contributes nothing), then S_i = sum_f w_f of those, then A = (S - mean(S)) / (std(S) + eps) over the batch's
  scorable rows; unscorable rows get A = 0, as in current TRL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["AdvantageOutput", "group_advantages", "CombinedRewards", "combine_rewards", "masked_group_advantages",
           "normalize_then_sum"]

Scale = Literal["group", "batch", "none"]
Singleton = Literal["reward", "zero"]


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
    scale: Scale = "group", baseline: Literal["mean", "leave_one_out"] = "mean",
    eps: float = 1e-6, singleton: Singleton = "reward",
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
    std = torch.where(single, torch.ones_like(sq), _safe_sqrt(sq / (count - 1).clamp_min(1)))  # [G], Bessel
    base = _baseline(r, index, single, mean, total, count, baseline)  # [N]
    if scale == "group":
        adv = (r - base) / (std[index] + eps)  # [N]
    elif scale == "batch":
        batch_std = _safe_sqrt(r.var()) if r.numel() > 1 else r.new_zeros(())  # [], Bessel, like torch.std
        adv = (r - base) / (torch.where(single, std, batch_std)[index] + eps)  # [N]; singletons keep s = 1
    elif scale == "none":
        adv = r - base  # [N]
    else:
        raise ValueError(f"unknown scale {scale!r}; expected 'group', 'batch' or 'none'")
    if singleton not in ("reward", "zero"):
        raise ValueError(f"unknown singleton rule {singleton!r}; expected 'reward' or 'zero'")
    if singleton == "zero":
        adv = torch.where(single[index], torch.zeros_like(adv), adv)
    return AdvantageOutput(advantages=adv, stats=_stats(r, adv, std, single))


def _safe_sqrt(var: Tensor) -> Tensor:
    """sqrt only where var > 0: sqrt'(0) is inf, and inf * 0 would put NaN in the rewards' gradient."""
    return torch.where(var > 0, torch.where(var > 0, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))


def _baseline(r: Tensor, index: Tensor, single: Tensor, mean: Tensor, total: Tensor, count: Tensor,
              baseline: str) -> Tensor:
    """b_k [N]: the group mean or the mean of the others; 0 in singleton groups."""
    if baseline == "mean":
        return torch.where(single, torch.zeros_like(mean), mean)[index]
    if baseline == "leave_one_out":
        return torch.where(single[index], torch.zeros_like(r), (total[index] - r) / (count[index] - 1).clamp_min(1))
    raise ValueError(f"unknown baseline {baseline!r}; expected 'mean' or 'leave_one_out'")


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


def masked_group_advantages(rewards: Tensor, group_ids: Sequence, *, scale: Scale = "group",
                            baseline: Literal["mean", "leave_one_out"] = "mean", eps: float = 1e-6,
                            singleton: Singleton = "reward") -> AdvantageOutput:
    """`group_advantages` over the rows with a finite reward; rows with a NaN reward get A = 0. A group with
    one finite reward is a singleton (`singleton`); batch scaling uses the std of the finite rewards."""
    ids = list(group_ids)
    if len(ids) != rewards.shape[0]:
        raise ValueError(f"group_ids has {len(ids)} entries but rewards has {rewards.shape[0]}")
    keep = ~torch.isnan(rewards)  # [N]
    kept = keep.nonzero().flatten()
    inner = group_advantages(rewards[kept], [ids[i] for i in kept.tolist()], scale=scale, baseline=baseline, eps=eps,
                             singleton=singleton)
    adv = torch.zeros_like(rewards).index_put((kept,), inner.advantages)  # [N]
    stats = dict(inner.stats, frac_reward_missing=float((~keep).double().mean()) if keep.numel() else 0.0)
    return AdvantageOutput(advantages=adv, stats=stats)


def normalize_then_sum(per_func: Tensor, group_ids: Sequence, weights: Tensor | Sequence[float] | None = None, *,
                       eps: float = 1e-6) -> AdvantageOutput:
    """TRL's multi_objective_aggregation="normalize_then_sum" (GDPO): per_func [N, F] with NaN for None.

    Each function's rewards are normalized in their group over the rows it applies to (A = 0 elsewhere and in
    groups where it applies to one row), summed with the weights, and the sums of the scorable rows are
    normalized over the batch: (S - mean S) / (std S + eps), std with Bessel's correction."""
    if per_func.dim() != 2:
        raise ValueError(f"per_func must be [rows, rewards], got shape {tuple(per_func.shape)}")
    w = torch.ones(per_func.shape[1], dtype=per_func.dtype) if weights is None else torch.as_tensor(
        weights, dtype=per_func.dtype)
    if w.shape != per_func.shape[1:]:
        raise ValueError(f"{w.numel()} weights for {per_func.shape[1]} rewards")
    ids = list(group_ids)
    per_f = [masked_group_advantages(per_func[:, f], ids, eps=eps, singleton="zero") for f in range(per_func.shape[1])]
    summed = sum(w[f] * out.advantages for f, out in enumerate(per_f))  # [N]
    scorable = ~torch.isnan(per_func).all(-1)  # [N]
    s = summed[scorable]  # [S]
    std = _safe_sqrt(s.var()) if s.numel() > 1 else s.new_zeros(())
    adv = torch.where(scorable, (summed - (s.mean() if s.numel() else 0.0)) / (std + eps), torch.zeros_like(summed))
    stats = {"batch_std": float(std), "advantage_mean": float(adv.mean()) if adv.numel() else 0.0,
             "advantage_std": float(adv.std()) if adv.numel() > 1 else 0.0,
             "frac_reward_missing": float((~scorable).double().mean()) if scorable.numel() else 0.0}
    return AdvantageOutput(advantages=adv, stats=stats)
