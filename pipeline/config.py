"""Settings as pydantic models: frozen, extra="forbid", one docstring per field. Values live in TOML files."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Settings", "TrainConfig", "load_toml"]

S = TypeVar("S", bound="Settings")


class Settings(BaseModel):
    """Base of every settings model: frozen, unknown keys rejected, field docstrings as descriptions."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    def digest(self) -> str:
        """Stable sha256 of the settings (sorted-key JSON of every field, defaults included)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class TrainConfig(Settings):
    """The optimizer, schedule, batching and checkpointing of one training run."""

    lr: float = Field(1e-6, gt=0)
    """Peak learning rate of AdamW (the paper's GFT setting: 1e-6)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping (the norm is still logged)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    num_steps: int | None = Field(None, ge=1)
    """Optimizer steps to take; None means `epochs` passes over the data."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the data when `num_steps` is None."""
    sequences_per_step: int = Field(8, ge=1)
    """Global batch: response sequences per optimizer step, summed over micro-batches and processes."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one process (padded mode)."""
    packing: bool = False
    """Pack several sequences into each row (no pad tokens) instead of padding every sequence."""
    micro_batch_tokens: int = Field(4096, ge=1)
    """Token budget of one packed micro-batch row (packed mode)."""
    logprob_chunk_size: int = Field(2048, ge=1)
    """Tokens per chunk of the output projection + log-softmax (bounds the float32 logits in memory)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast on GPU, full precision (the model's own dtype) on CPU."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward to save memory."""
    seed: int = 0
    """Seed of the data order and of torch/numpy/python RNGs at the start of training."""
    save_every: int | None = Field(None, ge=1)
    """Write a resumable checkpoint every this many optimizer steps (and at the end); None: only at the end."""
    keep_checkpoints: int = Field(1, ge=1)
    """How many of the newest checkpoints to keep."""
    log_every: int = Field(1, ge=1)
    """Report metrics every this many optimizer steps."""

    @model_validator(mode="after")
    def _batch_fits(self) -> TrainConfig:
        if self.warmup_steps and self.num_steps and self.warmup_steps > self.num_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds num_steps={self.num_steps}")
        return self


def load_toml(model: type[S], path: str | Path, *, section: str | None = None) -> S:
    """Validate a TOML file (or one table of it) into a settings model; errors name the file."""
    path = Path(path)
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    if section is not None:
        if section not in data:
            raise KeyError(f"{path}: no [{section}] table")
        data = data[section]
    try:
        return model.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
