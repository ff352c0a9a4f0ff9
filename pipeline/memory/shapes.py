"""Model shapes for the memory plan: a decoder-only causal LM's sizes from its config.json (parameters counted
from the shapes, dtype, layers, hidden size, heads and kv heads, intermediate size, vocabulary, tied embeddings)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GB", "BYTES", "ModelShape", "shape_from_config", "read_shape"]

GB = 1e9
BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only causal LM's shape, read from its config.json: enough for weights, KV cache and activations."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    dtype: str = "float32"  # the checkpoint's dtype (a scoring model loads in it)

    @property
    def params(self) -> int:
        """Parameters from the shapes: embeddings, per layer q/k/v/o, the gated MLP and two norms, the final norm,
        and the output projection unless tied to the embeddings."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        layer = attention + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def kv_bytes_per_token(self, nbytes: int) -> int:
        """KV cache bytes of one token: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * nbytes


def shape_from_config(config: Mapping) -> ModelShape:
    """The shape of a transformers config.json (Llama, Qwen2, Mistral, ... naming); a missing field fails here,
    naming it."""
    def need(name: str):
        if name not in config:
            raise ValueError(f"model config has no {name!r}: the memory plan needs the model's shape "
                             f"(fields present: {sorted(config)[:20]})")
        return config[name]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return ModelShape(vocab=int(need("vocab_size")), hidden=hidden, layers=int(need("num_hidden_layers")),
                      heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or hidden // heads),
                      intermediate=int(need("intermediate_size")), tied=bool(config.get("tie_word_embeddings", False)),
                      qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
                      dtype=dtype if dtype in BYTES else "float32")


def read_shape(folder: str | Path) -> ModelShape:
    """The shape of a model folder's config.json."""
    path = Path(folder) / "config.json"
    try:
        return shape_from_config(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
