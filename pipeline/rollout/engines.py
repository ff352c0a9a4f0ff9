"""Sampling engines: token-id prompts in, completions with raw log-probs out.

One `Engine` protocol, two implementations that share no base class:

- `HFEngine`: transformers `generate` on any machine (the default, and the reference in tests).
- `VLLMEngine`: `vllm.LLM` in the same process; vllm is imported only on this path.

Both take prompts as token ids (the caller applies the chat template once), so both see identical inputs,
and both return `Completion`s whose `logprobs` are those of the sampled tokens under the model's raw
distribution (temperature 1, no top-p): the numbers a trainer recomputes, whatever the sampling settings.
Sampling follows `SamplingConfig` only; a checkpoint's `generation_config.json` sampling defaults
(top_k, repetition_penalty, ...) are ignored by both engines, its eos ids are honoured by both.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import EngineConfig
from pipeline.rollout.completions import Completion, Engine, load_safetensors_dir
from pipeline.rollout.hf_engine import HFEngine, _left_pad  # noqa: F401 (_left_pad: bench/ imports it from here)
from pipeline.rollout.vllm_engine import VLLMEngine

__all__ = ["Completion", "Engine", "HFEngine", "VLLMEngine", "build_engine", "load_safetensors_dir"]


def build_engine(model_dir: str | Path, cfg: EngineConfig, *, progress: bool = True) -> Engine:
    """The engine `cfg.backend` names, loaded from an HF folder (weights, config, tokenizer)."""
    if cfg.backend == "vllm":
        return VLLMEngine.shared(model_dir, cfg)
    return HFEngine(model_dir, cfg, progress=progress)
