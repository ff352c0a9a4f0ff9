"""`HFEngine`: transformers `generate` (or `sample_compacting`) on any machine, the default engine and the reference
in tests. It records the raw log-prob (temperature 1, no top-p) of every sampled token step by step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.config import EngineConfig, SamplingConfig
from pipeline.progress import bar as progress_bar_of
from pipeline.rollout.completions import (DTYPES, Completion, check_request, finish_row, load_safetensors_dir,
                                          resolve_dtype)
from pipeline.rollout.decoding import draw_token, logit_warpers, sample_compacting

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


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
        dtype = DTYPES[resolve_dtype(cfg.dtype, device.type == "cuda")]
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
        check_request(prompt_ids, n, sampling, self.cfg)
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
        token_ids, logprobs, reason = finish_row(token_ids, logprobs, self.eos_ids)
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
