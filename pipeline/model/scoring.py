"""Scoring tokens with a causal LM, and the objectives that turn scored tokens into a loss.

`TokenScorer` runs the model and returns log p and entropy of the scored (response) tokens only, flat [M]:
the fused path projects just those hidden states in chunks (`logprobs.token_logprobs`). An `Objective` maps
one micro-batch's `ScoredTokens` and the step's totals to a `LossOutput` (GFT, SFT, DFT, GRPO).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.model import attention
from pipeline.model.batches import Example, StepTotals, collate_padded
from pipeline.model.logprobs import COMPILE_OPTIONS, token_logprobs, token_logprobs_from_logits
from pipeline.algo.losses import (
    Aggregation, KLEstimator, LossOutput, RatioLevel, dft_loss, gft_loss, grpo_loss, sft_loss, step_normalizer,
)

__all__ = ["ScoredTokens", "Objective", "gft_objective", "sft_objective", "dft_objective", "GRPOLossOptions",
           "grpo_objective", "TokenScorer", "differentiable_entropy", "scoring_temperature", "scorer_at",
           "ResponseScores", "score_responses", "scoring_chunk_rows", "SCORING_CHUNK_BYTES"]



@dataclass(frozen=True)
class ScoredTokens:
    """The scored (response) tokens of one micro-batch, flat: every tensor is [M]."""

    logprobs: Tensor
    entropy: Tensor | None
    advantages: Tensor
    old_logprobs: Tensor | None
    rows: Tensor
    mask: Tensor
    ref_logprobs: Tensor | None = None
    is_weights: Tensor | None = None


class Objective(Protocol):
    def __call__(self, scored: ScoredTokens, totals: StepTotals) -> LossOutput: ...


def gft_objective(*, tau: float, entropy_coeff: float = 0.0, aggregation: Aggregation = "token-mean",
                  max_response_tokens: int | None = None) -> Objective:
    """GFT with DCR threshold tau, aggregated over the step's global normalizer (`step_normalizer`: token-mean
    divides by the step's token count); entropy_coeff > 0 needs a scorer with a differentiable entropy
    (`differentiable_entropy`)."""
    step_normalizer(aggregation, tokens=0, sequences=0, max_response_tokens=max_response_tokens)  # fail early

    def objective(s: ScoredTokens, totals: StepTotals) -> LossOutput:
        normalizer = step_normalizer(aggregation, tokens=totals.tokens, sequences=totals.sequences,
                                     max_response_tokens=max_response_tokens)
        return gft_loss(s.logprobs, s.advantages, s.mask, tau=tau, normalizer=normalizer, entropy=s.entropy,
                        entropy_coeff=entropy_coeff, aggregation=aggregation, seq_index=s.rows)
    return objective


def sft_objective() -> Objective:
    """Plain SFT (advantages are ignored)."""
    def objective(s: ScoredTokens, totals: StepTotals) -> LossOutput:
        return sft_loss(s.logprobs, s.mask, normalizer=totals.tokens, entropy=s.entropy)
    return objective


def dft_objective() -> Objective:
    """DFT (advantages are ignored)."""
    def objective(s: ScoredTokens, totals: StepTotals) -> LossOutput:
        return dft_loss(s.logprobs, s.mask, normalizer=totals.tokens, entropy=s.entropy)
    return objective


@dataclass(frozen=True)
class GRPOLossOptions:
    """The floats and names `grpo_loss` takes besides its tensors (see there); one GRPOConfig makes one."""

    eps_low: float
    eps_high: float
    dual_clip: float | None = None
    ratio_level: RatioLevel = "token"
    beta: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_clamp: float | None = None
    entropy_coeff: float = 0.0
    aggregation: Aggregation = "token-mean"


def grpo_objective(options: GRPOLossOptions, *, max_response_tokens: int | None = None) -> Objective:
    """GRPO's clipped surrogate over the step's global normalizer: tokens (token-mean), sequences
    (seq-mean-token-mean, seq-mean-token-sum), max_response_tokens (seq-mean-token-sum-norm) or sequences x
    max_response_tokens (dr_grpo). A batch without old log-probs is on-policy: the old log-probs are the current
    ones detached, so the ratio is exactly 1 and the gradient is the advantage-weighted policy gradient."""
    step_normalizer(options.aggregation, tokens=0, sequences=0, max_response_tokens=max_response_tokens)
    kwargs = {k: getattr(options, k) for k in GRPOLossOptions.__dataclass_fields__}

    def objective(s: ScoredTokens, totals: StepTotals) -> LossOutput:
        old = s.logprobs.detach() if s.old_logprobs is None else s.old_logprobs
        normalizer = step_normalizer(options.aggregation, tokens=totals.tokens, sequences=totals.sequences,
                                     max_response_tokens=max_response_tokens)
        return grpo_loss(s.logprobs, old, s.advantages, s.mask, ref_logprobs=s.ref_logprobs, normalizer=normalizer,
                         is_weights=s.is_weights, seq_index=s.rows, entropy=s.entropy, **kwargs)
    return objective


def _plain_head(lm: nn.Module) -> nn.Linear | None:
    """The output projection when logits are exactly `hidden @ W.T + b`; None for softcapped or scaled heads."""
    head = lm.get_output_embeddings()
    cfg = lm.config
    if not isinstance(head, nn.Linear):
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    return head


def _compile_in_place(lm: nn.Module, scope: str, *, whole_model: bool) -> None:
    """torch.compile in place, so parameter names and checkpoints do not change. "layers": each decoder layer,
    one graph that every layer of the same code and shapes reuses (compiling costs about one layer, as
    torchtitan compiles per block); "model": the decoder body (the whole model when `whole_model`), one graph
    of every layer (compiling takes about as many times longer as there are layers)."""
    layers = getattr(lm.get_decoder(), "layers", None)
    if scope == "layers" and isinstance(layers, nn.ModuleList) and len(layers):
        for layer in layers:
            layer.compile(**COMPILE_OPTIONS)
    else:
        (lm if whole_model else lm.get_decoder()).compile(**COMPILE_OPTIONS)


class TokenScorer(nn.Module):
    """Wraps a causal LM so that one forward returns log p and entropy of the scored tokens, flat [M].

    The fused path runs the decoder, keeps only hidden states at scored positions and applies the output
    projection in checkpointed chunks; models whose logits are not a plain projection go through the full
    forward and chunked log-softmax. Wrapping in one module keeps DDP's hooks on the whole computation.
    `compiled` compiles the decoder (`_compile_in_place`: each layer, or the whole body with `compile_scope`
    "model") and the log-prob chunk kernels;
    `varlen` makes packed rows (`packed` given to forward) attend per sequence without a mask tensor;
    `keep_logits` keeps the fused head's logits for backward instead of recomputing them;
    `entropy_grad` (set by `differentiable_entropy`) returns an entropy that carries its gradient, for an
    entropy bonus: recomputed from the same hidden states (or logits) in checkpointed chunks, one more
    output-projection matmul per chunk in forward and in backward. Otherwise the entropy is detached.
    `temperature` (set by `scoring_temperature`) scores softmax(logits / T), log p and entropy alike, on both
    paths; 1 scores the raw distribution.
    """

    entropy_grad: bool = False

    def __init__(self, lm: nn.Module, *, chunk_size: int = 2048, fused: bool | None = None,
                 compiled: bool = False, varlen: bool = False, keep_logits: bool = False,
                 compile_scope: str = "layers", temperature: float = 1.0):
        super().__init__()
        self.lm, self.chunk_size, self.compiled, self.keep_logits = lm, chunk_size, compiled, keep_logits
        self.temperature = float(temperature)
        self.fused = _plain_head(lm) is not None if fused is None else fused
        self.varlen = varlen and not getattr(lm.config, "use_sliding_window", False)
        if self.varlen:  # behaves as SDPA unless a forward passes sequence boundaries
            lm.config._attn_implementation = attention.register()
        if compiled:
            _compile_in_place(lm, compile_scope, whole_model=not self.fused)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None, attention_mask: Tensor | None,
                targets: Tensor, loss_mask: Tensor | None, packed: attention.PackedLengths | None = None,
                positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """log p and entropy [M] of the scored positions: `loss_mask` [R, L], or `positions` [M], the flat
        indices of its true entries found on the host (a mask on the device must be counted there: a sync)."""
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        if packed is not None and self.varlen:  # no mask is built; the attention splits the sequences
            inputs.update(packed)
        index = loss_mask.reshape(-1).nonzero()[:, 0] if positions is None else positions  # [M] into R * L
        labels = targets.reshape(-1)[index]  # [M]
        if self.fused:
            hidden = self.lm.get_decoder()(**inputs, use_cache=False).last_hidden_state  # [R, L, H]
            head = self.lm.get_output_embeddings()
            picked = hidden.flatten(0, 1)[index]  # [M, H]
            stats = token_logprobs(picked, head.weight, labels, bias=head.bias, chunk_size=self.chunk_size,
                                   compiled=self.compiled, keep_logits=self.keep_logits, temperature=self.temperature)
            rows, extra = picked, (head.weight, head.bias)
        else:
            logits = self.lm(**inputs, use_cache=False).logits  # [R, L, V]
            rows, extra = logits.flatten(0, 1)[index], ()  # [M, V]
            stats = token_logprobs_from_logits(rows, labels, chunk_size=self.chunk_size, temperature=self.temperature)
        if self.entropy_grad and torch.is_grad_enabled():
            entropy = _entropy_with_grad(rows, extra, self.chunk_size, self.temperature)
            return stats.logprobs, entropy.to(stats.logprobs.dtype)
        return stats.logprobs, stats.entropy


def _chunk_entropy(rows: Tensor, temperature: float, *head: Tensor | None) -> Tensor:
    """H of softmax(z / temperature) over the vocabulary of one chunk: rows are logits z [C, V], or hidden
    states [C, H] with the head's (weight, bias). float32 at least, like the log-probs."""
    z = rows if not head else nn.functional.linear(rows, head[0].to(rows.dtype), None if head[1] is None
                                                   else head[1].to(rows.dtype))  # [C, V]
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # [C, V]
    logsm = torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)  # [C, V]
    return -(logsm.exp() * logsm).sum(-1)  # [C]


def _entropy_with_grad(rows: Tensor, head: tuple, chunk_size: int, temperature: float = 1.0) -> Tensor:
    """Token entropy [M] with its gradient, in checkpointed row chunks (a few [chunk, V] blocks in memory)."""
    parts = [checkpoint(_chunk_entropy, rows[s:s + chunk_size], temperature, *head, use_reentrant=False)
             for s in range(0, rows.shape[0], chunk_size)]
    return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)


def differentiable_entropy(scorer: nn.Module, on: bool) -> None:
    """Make `scorer` (a TokenScorer, possibly wrapped by DDP) return an entropy with its gradient, for an entropy
    bonus (`on`), or the cheaper detached one."""
    inner = getattr(scorer, "module", scorer)
    if not isinstance(inner, TokenScorer):
        raise TypeError(f"differentiable_entropy needs a TokenScorer, got {type(inner).__name__}")
    inner.entropy_grad = on


def _token_scorer(scorer: nn.Module, what: str) -> TokenScorer:
    inner = getattr(scorer, "module", scorer)
    if not isinstance(inner, TokenScorer):
        raise TypeError(f"{what} needs a TokenScorer, got {type(inner).__name__}")
    return inner


def scoring_temperature(scorer: nn.Module, temperature: float) -> None:
    """Make `scorer` (a TokenScorer, possibly wrapped by DDP) score at softmax(logits / temperature): log p and
    entropy, with their gradients. 1 scores the raw distribution."""
    if not temperature > 0:
        raise ValueError(f"scoring temperature must be > 0, got {temperature}")
    _token_scorer(scorer, "scoring_temperature").temperature = float(temperature)


@contextmanager
def scorer_at(model: nn.Module, temperature: float) -> Iterator[nn.Module]:
    """`model` scoring at `temperature` for `score_responses`: a TokenScorer (or a DDP-wrapped one: its module)
    with its temperature set for the duration, a causal LM wrapped in a TokenScorer at that temperature, or, at
    temperature 1, a causal LM as it is (its raw distribution, as before the option existed)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, TokenScorer):
        yield model if temperature == 1.0 else TokenScorer(model, temperature=temperature)
        return
    before = inner.temperature
    scoring_temperature(inner, temperature)
    try:
        yield inner
    finally:
        inner.temperature = before


@dataclass(frozen=True)
class ResponseScores:
    """Per-response token log-probs and entropies under a model (teacher-forced, no gradient)."""

    logprobs: list[Tensor]  # one [T_k] float tensor per response
    entropy: list[Tensor]  # one [T_k] float tensor per response


SCORING_CHUNK_BYTES = 64 * 2**20
"""The float32 logits of one scoring chunk, at most ([rows, V] x 4 bytes): `score_responses`'s memory bound."""


def scoring_chunk_rows(vocab_size: int, *, cap: int = 2048) -> int:
    """Rows per logits chunk so that one chunk's float32 logits stay within SCORING_CHUNK_BYTES (at most `cap`;
    a chunk's rows are scored independently, so the size changes memory, not the numbers)."""
    return max(1, min(cap, SCORING_CHUNK_BYTES // (4 * vocab_size)))


@torch.no_grad()
def score_responses(model: nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                    pad_id: int, batch_size: int = 16, chunk_size: int | None = None) -> ResponseScores:
    """log p and entropy of every response token given its prompt, in padded batches on the model's device, the
    output projection in chunks of `chunk_size` rows (default `scoring_chunk_rows`: 341 rows of a 49k
    vocabulary, 64 MiB of logits). `model` is a causal LM or a TokenScorer (a trainer's FSDP2 scorer: its forward
    gathers the sharded parameters, so every process must score the same batches)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    examples = [Example(p, r) for p, r in zip(prompts, responses)]
    scorer = model if isinstance(model, TokenScorer) else TokenScorer(
        model, chunk_size=chunk_size or scoring_chunk_rows(model.get_output_embeddings().weight.shape[0]))
    device = next(model.parameters()).device
    logps, ents = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate_padded(examples, range(start, min(start + batch_size, len(examples))), pad_id)
        mask = batch.loss_mask.to(device)
        lp, ent = scorer(batch.input_ids.to(device), batch.position_ids.to(device),
                         batch.attention_mask.to(device), batch.targets.to(device), mask)
        rows = batch.rows.to(device)[mask]  # [M] example index of every scored token
        for i in range(start, min(start + batch_size, len(examples))):
            logps.append(lp[rows == i].float().cpu())
            ents.append(ent[rows == i].float().cpu())
    return ResponseScores(logprobs=logps, entropy=ents)
