"""Loading a Hugging Face causal LM for the trainer or for scoring, honouring `trust_remote_code` everywhere."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_model"]


def load_model(path: str, *, trust_remote_code: bool = False, train: bool = False) -> nn.Module:
    """The model of a folder or hub id. For training (`train`) the weights are float32 whatever the checkpoint's
    dtype (a bf16 weight does not move at lr 1e-6; compute still runs under bf16 autocast on GPU); for scoring
    they keep the checkpoint's dtype. Scoring models are returned in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if train else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    return model if train else model.eval()
