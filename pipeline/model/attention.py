"""Padding-free packed attention: each packed sequence attends only to itself, with no mask tensor.

`collate_packed` puts several sequences in one row and restarts `position_ids` at each of them. transformers'
own SDPA path turns that into a dense block-diagonal [L, L] mask, so the attention of a packed row costs as
much as one sequence of the row's whole length (quadratic in L). The "gft_varlen" attention below takes the
sequence boundaries (`cu_seq_lens_q`, as in flash-attention's varlen API) instead:

- CUDA, bf16/fp16 (autocast's dtype when it is on): `torch.nn.attention.varlen.varlen_attn` (flash varlen
  kernel), causal within each sequence.
- elsewhere (CPU, float32, or a torch without varlen_attn): one causal SDPA call per sequence (the reference).

Without `cu_seq_lens_q` it is plain SDPA with transformers' SDPA mask, so generation and padded batches on a
model set to "gft_varlen" behave as with "sdpa". One difference: a packed row given without its boundaries
(no attention mask, restarting position ids) is not split into sequences; `TokenScorer` always passes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from pipeline.model.logprobs import compute_dtype

__all__ = ["VARLEN", "PackedLengths", "packed_lengths", "register", "varlen_available"]

VARLEN = "gft_varlen"


class PackedLengths(dict):
    """Keyword arguments a decoder forward passes to the attention: cu_seq_lens_q [S + 1] int32, max_length_q."""


def packed_lengths(position_ids: Tensor) -> PackedLengths:
    """Sequence boundaries of packed rows [R, L] whose position ids restart at 0 at each sequence (CPU-side,
    so no device sync). Rows are concatenated: boundaries index the flattened R * L positions."""
    flat = position_ids.reshape(-1).cpu()  # [R * L]
    starts = torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]
    if starts[0] != 0:
        raise ValueError("packed position_ids must start at 0")
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
    cu = torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32)  # [S + 1]
    return PackedLengths(cu_seq_lens_q=cu, max_length_q=max(lengths))


def _cumsum(xs: Sequence[int]):
    total = 0
    for x in xs:
        total += x
        yield total


def _find_varlen():
    """torch's flash varlen attention and the names of its keyword arguments, or (None, ()) without one."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, ()
    return varlen_attn, tuple(inspect.signature(varlen_attn).parameters)


_VARLEN_ATTN, _VARLEN_PARAMS = _find_varlen()  # looked up once, outside any compiled region


def varlen_available(device: torch.device) -> bool:
    """Whether the flash varlen kernel serves this device (CUDA with a torch that has varlen_attn)."""
    return device.type == "cuda" and _VARLEN_ATTN is not None


def _varlen_kernel(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float) -> Tensor:
    """Flash varlen attention, causal per sequence. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    varlen_attn, params = _VARLEN_ATTN, _VARLEN_PARAMS
    kwargs = {}
    if "window_size" in params:  # torch >= 2.12: causal = window (-1, 0), GQA and scale are arguments
        kwargs["window_size"] = (-1, 0)
    else:  # torch 2.10-2.11: is_causal flag, no GQA or scale arguments
        kwargs["is_causal"] = True
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"this torch's varlen_attn has no scale argument and scaling {scale} is not 1/sqrt(d)")
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _per_sequence(q: Tensor, k: Tensor, v: Tensor, cu: list[int], scale: float) -> Tensor:
    """Reference path: one causal SDPA per sequence. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                             enable_gqa=ks.shape[0] != qs.shape[0])
        outs.append(out.transpose(0, 1))  # [n, Hq, D]
    return torch.cat(outs)


def varlen_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention interface: query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout and module.training:
        raise ValueError("gft_varlen attention does not implement attention dropout")
    b, hq, length, d = query.shape
    scale = d ** -0.5 if scaling is None else scaling
    # Under autocast, q and k arrive in float32 (RoPE multiplies the bf16 projections by float32 cos/sin) and v
    # in bf16. Autocast casts SDPA's inputs itself; the flash kernel is not an autocast op, so cast them here.
    q, k, v = (x.transpose(1, 2).reshape(b * length, x.shape[1], d).to(compute_dtype(x))
               for x in (query, key, value))  # [T, H, D]
    if varlen_available(q.device) and q.dtype in (torch.float16, torch.bfloat16):
        out = _varlen_kernel(q, k, v, cu.to(q.device, torch.int32), int(kwargs["max_length_q"]), scale)
    else:
        out = _per_sequence(q, k, v, cu.tolist(), scale)
    return out.reshape(b, length, hq, d), None


def _varlen_mask(*args, attention_mask: Tensor | None = None, **kwargs):
    """No mask without padding (the attention is causal by itself, per sequence when packed); else SDPA's."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register "gft_varlen" with transformers (its attention and mask functions); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if VARLEN not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(VARLEN, varlen_attention_forward)
        AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return VARLEN
