"""What every sampling engine shares: the `Engine` protocol, the `Completion` it returns, the checks on a request
before any memory is allocated for it, eos cutting, and reading an HF checkpoint folder's tensors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from pipeline.config import EngineConfig, SamplingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt."""

    text: str
    """The completion decoded with skip_special_tokens=True."""
    token_ids: list[int]
    """Generated ids, ending with the eos id when the completion stopped on eos."""
    logprobs: list[float]
    """Per token of `token_ids`: its log-prob under the raw model distribution (temperature 1, no top-p)."""
    finish_reason: str
    """"stop" (an eos id was generated) or "length" (`max_new_tokens` reached)."""


class Engine(Protocol):
    """Samples completions from a causal LM whose weights can be refreshed in place."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingConfig) -> list[list[Completion]]:
        """`n` completions per prompt, as [prompts][n], in prompt order."""
        ...

    def load_weights(self, model_dir: str | Path) -> None:
        """Replace the weights with those of an HF checkpoint folder of the same architecture."""
        ...

    def close(self) -> None:
        """Release the model and any worker resources."""
        ...


def resolve_dtype(dtype: str, on_gpu: bool) -> str:
    """EngineConfig's dtype as a concrete name: auto = bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


def check_request(prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig, cfg: EngineConfig) -> None:
    """Refuse a request before any memory is allocated for it: an empty prompt, or one whose tokens plus
    max_new_tokens do not fit engine.max_model_len."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
        if len(ids) + sampling.max_new_tokens > cfg.max_model_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens = {sampling.max_new_tokens} it "
                             f"needs {len(ids) + sampling.max_new_tokens} > engine.max_model_len = {cfg.max_model_len}")


def finish_row(token_ids: list[int], logprobs: list[float], eos_ids: frozenset[int]) -> tuple[list[int], list[float], str]:
    """Cut a generated row after its first eos id; "stop" if there was one, else "length"."""
    for t, tok in enumerate(token_ids):
        if tok in eos_ids:
            return token_ids[: t + 1], logprobs[: t + 1], "stop"
    return token_ids, logprobs, "length"


def load_safetensors_dir(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint folder (`model.safetensors` or the shards its index names)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(model_dir / name)))
    return state

