"""Loading a Hugging Face causal LM for the trainer or for scoring, honouring `trust_remote_code` everywhere."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_model", "checkpoint_dtype", "save_dtype"]


def load_model(path: str, *, trust_remote_code: bool = False, train: bool = False,
               master_dtype: str = "float32") -> nn.Module:
    """The model of a folder or hub id. For training (`train`) the weights are `master_dtype` (float32 unless a
    float64 check asks for more) whatever the checkpoint's dtype (a bf16 weight does not move at lr 1e-6; compute
    still runs under bf16 autocast on GPU); for scoring they keep the checkpoint's dtype. Scoring models are
    returned in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, master_dtype) if train else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    return model if train else model.eval()


def checkpoint_dtype(path: str, *, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a checkpoint's config declares for its weights (float32 when it declares none)."""
    from transformers import AutoConfig

    declared = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).dtype
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def save_dtype(setting: str, source: str, *, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a trained checkpoint is saved in: TrainConfig.save_dtype, "source" meaning the source's."""
    if setting == "source":
        return checkpoint_dtype(source, trust_remote_code=trust_remote_code)
    return getattr(torch, setting)
