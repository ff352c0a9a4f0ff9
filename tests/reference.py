"""Float64 loop references: one Python loop per token, written from the formulas, not from the library."""

import math

import torch


def gft_reference(logprobs, advantages, mask, *, tau, normalizer=None):
    """sum over masked tokens of -A * C(p) * log p, C = p (detached) if p <= tau else 1, / normalizer."""
    lp = logprobs.double()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            a = float(advantages[i]) if advantages.dim() == 1 else float(advantages[i, t])
            p = math.exp(lp[i, t].item())
            c = p if p <= tau else 1.0
            total = total - a * c * lp[i, t]
            count += 1
    return total / (count if normalizer is None else normalizer)


def grpo_reference(logprobs, old_logprobs, advantages, mask, *, eps_low, eps_high, beta=0.0, ref_logprobs=None,
                   aggregation="token-mean", normalizer=None, is_weights=None):
    lp = logprobs.double()
    n, t_len = lp.shape
    zero = 0.0 * lp.sum()  # keeps the graph connected when every token is clipped
    seq_sums, seq_counts = [], []
    for i in range(n):
        s = zero
        cnt = 0
        for t in range(t_len):
            if not mask[i, t]:
                continue
            a = float(advantages[i]) if advantages.dim() == 1 else float(advantages[i, t])
            ratio = torch.exp(lp[i, t] - float(old_logprobs[i, t]))
            r = ratio.item()
            # clip() as a constant outside the range: its gradient is zero there
            clipped = ratio if 1 - eps_low <= r <= 1 + eps_high else torch.tensor(min(max(r, 1 - eps_low), 1 + eps_high),
                                                                                 dtype=torch.float64)
            term = -(ratio * a) if ratio * a <= clipped * a else -(clipped * a)
            if is_weights is not None:
                term = term * float(is_weights[i, t])
            if beta:
                d = ref_logprobs[i, t].item() - lp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            s = s + term
            cnt += 1
        seq_sums.append(s)
        seq_counts.append(cnt)
    if aggregation == "token-mean":
        return sum(seq_sums) / (sum(seq_counts) if normalizer is None else normalizer)
    if aggregation == "seq-mean-token-mean":  # sequences without tokens are left out (verl)
        present = [(s, c) for s, c in zip(seq_sums, seq_counts) if c > 0]
        return sum(s / c for s, c in present) / (len(present) if normalizer is None else normalizer)
    return sum(seq_sums) / (n * t_len if normalizer is None else normalizer)  # dr_grpo


def advantages_reference(rewards, group_ids, *, scale="group", baseline="mean", eps=1e-6, singleton="reward"):
    """(R - b) / (s + eps): b the group mean or the others' mean, s the group's or the batch's Bessel std, or
    no division; a one-member group gets b = 0, s = 1 (singleton "reward") or A = 0 (singleton "zero", TRL)."""
    r = [x for x in rewards]
    out = [None] * len(r)
    n_all = len(r)
    batch_mean = sum(r) / n_all
    batch_std = (sum((v - batch_mean) ** 2 for v in r) / (n_all - 1)) ** 0.5 if n_all > 1 else 0.0
    for g in dict.fromkeys(group_ids):
        idx = [i for i, h in enumerate(group_ids) if h == g]
        vals = [r[i] for i in idx]
        n = len(vals)
        if n == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(vals) / n
            std = (sum((v - mean) ** 2 for v in vals) / (n - 1)) ** 0.5
        for i in idx:
            if baseline == "mean" or n == 1:
                b = mean
            else:
                b = (sum(vals) - r[i]) / (n - 1)
            if n == 1 and singleton == "zero":
                out[i] = 0.0 * r[i]
            elif scale == "group" or (scale == "batch" and n == 1):
                out[i] = (r[i] - b) / (std + eps)
            elif scale == "batch":
                out[i] = (r[i] - b) / (batch_std + eps)
            else:
                out[i] = r[i] - b
    return out


def token_stats_reference(hidden, weight, bias, labels):
    """Full float64 log-softmax over the vocabulary: log p(label) and entropy per row."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def importance_weights_reference(trainer_lp, sampler_lp, mask, *, level, cap, floor=None, masking=False):
    """Per token: exp(lp - q); per sequence: exp(sum of lp - q over its tokens); then truncated to [floor, cap],
    or (masking) 0 outside [floor, cap] (TRL's vllm_importance_sampling_mode); 1 on masked positions."""
    n, t_len = trainer_lp.shape
    w = [[1.0] * t_len for _ in range(n)]
    for i in range(n):
        seq = sum(float(trainer_lp[i, t]) - float(sampler_lp[i, t]) for t in range(t_len) if mask[i, t])
        for t in range(t_len):
            if not mask[i, t] or level == "none":
                continue
            d = seq if level == "sequence" else float(trainer_lp[i, t]) - float(sampler_lp[i, t])
            rho, low = math.exp(d), (-math.inf if floor is None else floor)
            if masking:
                w[i][t] = rho if low <= rho <= cap else 0.0
            else:
                w[i][t] = min(max(rho, low), cap)
    return torch.tensor(w, dtype=torch.float64)


def mismatch_reference(trainer_lp, sampler_lp, mask):
    diffs = [float(trainer_lp[i, t]) - float(sampler_lp[i, t])
             for i in range(trainer_lp.shape[0]) for t in range(trainer_lp.shape[1]) if mask[i, t]]
    return {"mean": sum(abs(d) for d in diffs) / len(diffs), "max": max(abs(d) for d in diffs),
            "k3": sum(math.exp(d) - d - 1 for d in diffs) / len(diffs)}


def combine_rewards_reference(per_func, weights):
    """Weighted sum over the non-None entries of each row; None when every entry is None."""
    out = []
    for row in per_func:
        vals = [w * r for r, w in zip(row, weights) if r is not None]
        out.append(sum(vals) if vals else None)
    return out


def aggregate_reference(sums, counts, aggregation, t_len, n=None):
    """A loss from per-sequence token sums and counts under verl's loss_agg_mode (float64 loop references):
    token-mean, the seq-mean-* modes over sequences with tokens, and dr_grpo (sum / (n x t_len))."""
    present = [(s, c) for s, c in zip(sums, counts) if c > 0]
    if aggregation == "token-mean":
        return sum(sums) / sum(counts)
    if aggregation == "seq-mean-token-mean":
        return sum(s / c for s, c in present) / len(present)
    if aggregation == "seq-mean-token-sum":
        return sum(s for s, _ in present) / len(present)
    if aggregation == "seq-mean-token-sum-norm":
        return sum(sums) / t_len
    return sum(sums) / (n * t_len)  # dr_grpo
