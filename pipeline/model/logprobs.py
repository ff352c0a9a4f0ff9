"""Token log-probs and entropy of target tokens, chunked over rows: the fast path under every loss.

`token_logprobs` (hidden states and the output projection, fused: forward keeps
one log-sum-exp per row; backward recomputes each chunk's logits, or reuses them with `keep_logits`) or
`token_logprobs_from_logits` (row chunks under activation checkpointing, for heads that are not a plain
projection). Neither holds a float32 copy of the full [tokens, vocab] logits at once, in forward or backward.
Both return `TokenStats`: log p of each label (with grad) and the distribution's entropy (detached), of
softmax(logits / temperature): temperature 1 (the default) scores the raw distribution, any other the tempered one
an engine samples from (verl's and TRL's logits / T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["TokenStats", "COMPILE_OPTIONS", "compute_dtype", "token_logprobs", "token_logprobs_from_logits"]


@dataclass(frozen=True)
class TokenStats:
    """Per-token log-probability of the target token (with grad) and entropy of the distribution (detached)."""

    logprobs: Tensor
    entropy: Tensor | None


def _stats_from_logits(logits: Tensor, labels: Tensor, with_entropy: bool,
                       temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [C, V], one chunk only
    if temperature != 1.0:
        logits = logits / temperature  # [C, V]
    logsm = torch.log_softmax(logits, dim=-1)  # [C, V], one kernel
    logprobs = logsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [C]
    if not with_entropy:
        return logprobs, logprobs.new_zeros(())
    with torch.no_grad():
        entropy = -(logsm.exp() * logsm).sum(-1)  # [C]
    return logprobs, entropy


def compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for x's device (bf16 training), else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype,
                 temperature: float = 1.0) -> Tensor:
    """One chunk's logits [C, V] in the matmul dtype (`weight` already in it), divided by the temperature."""
    z = hidden.to(dtype) @ weight.T  # [C, V]
    z = z if bias is None else z + bias.to(dtype)
    return z if temperature == 1.0 else z / temperature


def _plain_stats(z: Tensor, lab: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(log p(label), log-sum-exp, entropy), each [C], of one chunk's logits z [C, V]: one float32 log-softmax,
    reused in place for the entropy."""
    zf = z.to(torch.promote_types(z.dtype, torch.float32))  # [C, V]
    logsm = torch.log_softmax(zf, dim=-1)  # [C, V]
    logprobs = logsm.gather(-1, lab[:, None])[:, 0]  # [C]
    lse = zf.gather(-1, lab[:, None])[:, 0] - logprobs  # [C]
    if not with_entropy:
        return logprobs, lse, torch.zeros_like(lse)
    return logprobs, lse, lse - torch.linalg.vecdot(logsm.exp_(), zf)  # H = lse - sum_v p_v z_v


def _plain_grad(z: Tensor, lab: Tensor, lse: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    """d loss / d logits of one chunk, g * (onehot(label) - softmax(z)), [C, V] in the matmul dtype; one float32
    block, formed in place (z itself is left untouched: it may be a kept forward tensor)."""
    dz = z.to(torch.promote_types(z.dtype, torch.float32), copy=True)  # [C, V]
    dz.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    dz.scatter_add_(-1, lab[:, None], g[:, None])
    return dz.to(dtype)


# Compiled chunk kernels: the same math written without in-place ops, so inductor fuses the float32 upcast,
# log-sum-exp, gather, entropy and softmax gradient into the passes over the bf16 logits (no float32 [chunk, V]
# block is ever written to memory). Compiled lazily, once per process.
_COMPILED: dict[str, object] = {}
COMPILE_OPTIONS: dict = {}
"""Keyword arguments of every torch.compile call of the training fast paths (a bench may pick a cheap backend)."""


def _chunk_stats(z: Tensor, lab: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`_plain_stats` in one pass over z: exp(z - max) is shared by the log-sum-exp and the entropy."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # [C, V] (fused away when compiled)
    top = z.amax(-1, keepdim=True)  # [C, 1]
    e = torch.exp(z - top)  # [C, V]
    total = e.sum(-1)  # [C]
    lse = top[:, 0] + torch.log(total)  # [C]
    logprobs = z.gather(-1, lab[:, None])[:, 0] - lse  # [C]
    if not with_entropy:
        return logprobs, lse, torch.zeros_like(lse)
    return logprobs, lse, lse - (e * z).sum(-1) / total  # H = lse - E_p[z]


def _chunk_grad_logits(z: Tensor, lab: Tensor, lse: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    """`_plain_grad` as one fused elementwise pass."""
    zf = z.to(torch.promote_types(z.dtype, torch.float32))  # [C, V]
    onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == lab[:, None]  # [C, V] bool
    return (g[:, None] * (onehot.to(zf.dtype) - torch.exp(zf - lse[:, None]))).to(dtype)  # [C, V]


def _kernels(compiled: bool) -> tuple:
    """(stats, grad) chunk kernels: plain, or compiled (once per process)."""
    if not compiled:
        return _plain_stats, _plain_grad
    if not _COMPILED:
        _COMPILED.update(stats=torch.compile(_chunk_stats, **{"dynamic": None, **COMPILE_OPTIONS}),
                         grad=torch.compile(_chunk_grad_logits, **{"dynamic": None, **COMPILE_OPTIONS}))
    return _COMPILED["stats"], _COMPILED["grad"]


class _HeadLogprobs(torch.autograd.Function):
    """log p(label) and entropy of softmax(hidden @ W.T + b), chunked over rows, never a float32 [N, V] block.

    Forward keeps per row the log-sum-exp, and, with `keep_logits`, each chunk's logits in the matmul dtype
    ([N, V] x 2 bytes under bf16). Backward forms d logp / d z = onehot(label) - softmax(z) per chunk from the
    kept logits, or from logits recomputed with one more [C, H] x [H, V] matmul per chunk (the default: memory
    holds a few [chunk, V] blocks at a time). The chunk math is plain torch or compiled (`_kernels`). At a
    temperature T != 1, z = (hidden @ W.T + b) / T, and the gradient of the raw logits is that of z over T.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, with_entropy: bool, compiled: bool,
                keep_logits: bool, temperature: float = 1.0):
        dtype, (stats, _) = compute_dtype(hidden), _kernels(compiled)
        parts, kept = [], []
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # [V, H], converted once, not per chunk
            for s in range(0, hidden.shape[0], chunk_size):
                z = _head_logits(hidden[s:s + chunk_size], w, bias, dtype, temperature)  # [C, V]
                parts.append(stats(z, labels[s:s + chunk_size], with_entropy))
                kept += [z] if keep_logits else []
        empty = hidden.new_zeros(0, dtype=torch.promote_types(dtype, torch.float32))  # [0]
        logprobs, lse, entropy = (torch.cat(x) for x in zip(*parts)) if parts else (empty,) * 3  # [N] each
        ctx.save_for_backward(hidden, weight, bias, labels, lse, *kept)
        ctx.chunk_size, ctx.dtype, ctx.compiled, ctx.temperature = chunk_size, dtype, compiled, temperature
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, bias, labels, lse, *kept = ctx.saved_tensors
        dtype, c, (_, grad_logits), t = ctx.dtype, ctx.chunk_size, _kernels(ctx.compiled), ctx.temperature
        if t != 1.0:  # d z / d raw logits = 1 / T: folded into the incoming gradient, one [N] op
            grad_logprobs = grad_logprobs / t
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # chunks are summed in at least float32
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for i, s in enumerate(range(0, hidden.shape[0], c)):
                h = hidden[s:s + c]
                z = kept[i] if kept else _head_logits(h, w, bias, dtype, t)  # [C, V]
                dz = grad_logits(z, labels[s:s + c], lse[s:s + c], grad_logprobs[s:s + c], dtype)  # [C, V]
                if grad_h is not None:
                    grad_h[s:s + c] = (dz @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (dz.T @ h.to(dtype)).to(acc)
                if grad_b is not None:
                    grad_b += dz.sum(0).to(acc)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _check_rows(x: Tensor, labels: Tensor, name: str) -> None:
    if x.dim() != 2 or labels.dim() != 1 or x.shape[0] != labels.shape[0]:
        raise ValueError(f"{name} must be [N, D] with labels [N]; got {name} {tuple(x.shape)} "
                         f"and labels {tuple(labels.shape)}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a positive finite number to score at, got {temperature}")


def _chunked(fn, rows: Tensor, labels: Tensor, extra: tuple, chunk_size: int, with_entropy: bool,
             temperature: float = 1.0) -> TokenStats:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (
        rows.requires_grad or any(isinstance(a, Tensor) and a.requires_grad for a in extra))
    logps, ents = [], []
    for start in range(0, rows.shape[0], chunk_size):
        args = (rows[start:start + chunk_size], *extra, labels[start:start + chunk_size], with_entropy, temperature)
        if needs_grad:
            lp, ent = checkpoint(fn, *args, use_reentrant=False)
        else:
            lp, ent = fn(*args)
        logps.append(lp)
        ents.append(ent)
    logprobs = torch.cat(logps) if logps else rows.new_zeros(0, dtype=torch.float32)
    entropy = (torch.cat(ents) if ents else logprobs.detach().clone()) if with_entropy else None
    return TokenStats(logprobs=logprobs, entropy=entropy)


def token_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
    chunk_size: int = 1024, with_entropy: bool = True, compiled: bool = False, keep_logits: bool = False,
    temperature: float = 1.0,
) -> TokenStats:
    """Log p(label) and entropy of softmax((hidden @ weight.T + bias) / temperature), chunked over rows.

    Args:
        hidden: [N, H] final (normalized) hidden states at the positions that predict `labels`.
        weight: [V, H] output projection (`lm_head.weight`); bias: optional [V].
        labels: [N] int64 target token ids.
    Returns TokenStats with float32 (float64 for float64 inputs) logprobs [N] (differentiable) and entropy [N]
    (detached). No float32 copy of the [N, V] logits exists at any time: forward saves one log-sum-exp per row
    and backward recomputes each chunk's logits once, so memory holds a few [chunk_size, V] float32 blocks.
    `keep_logits=True` keeps the logits in the matmul dtype instead ([N, V] x 2 bytes under bf16), saving
    backward that matmul. `compiled=True` runs each chunk's math through torch.compile: only the
    [chunk_size, V] logits in the matmul dtype are written. Every combination gives the same numbers.
    """
    _check_rows(hidden, labels, "hidden")
    _check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    logprobs, entropy = _HeadLogprobs.apply(hidden, weight, bias, labels, chunk_size, with_entropy, compiled,
                                            keep_logits and grad, float(temperature))  # no backward: nothing to keep
    return TokenStats(logprobs=logprobs, entropy=entropy if with_entropy else None)


def token_logprobs_from_logits(
    logits: Tensor, labels: Tensor, *, chunk_size: int = 2048, with_entropy: bool = True, temperature: float = 1.0,
) -> TokenStats:
    """Log p(label) and entropy of softmax(logits / temperature) from logits [N, V] (any float dtype) and labels
    [N], chunked over rows (the division in float32 at least, after the upcast)."""
    _check_rows(logits, labels, "logits")
    _check_temperature(temperature)
    return _chunked(_stats_from_logits, logits, labels, (), chunk_size, with_entropy, float(temperature))
