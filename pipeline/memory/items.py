"""The items of the memory plan: the arithmetic of what an engine, a trainer and a scoring model hold, from a
model's shape and the settings, in GB (1e9 bytes), as `pipeline.memory.measure` reports them. The constants are
calibrated against measured peaks (docs/memory.md); the structure is the arithmetic of the shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import EngineConfig, TrainConfig
from pipeline.memory.shapes import BYTES, GB, ModelShape

__all__ = ["BASELINE_CPU_GB", "TRACKING_CPU_GB", "CUDA_CONTEXT_CPU_GB", "Item", "Where", "Phase", "prompt_len",
           "engine_items", "trainer_items", "scoring_items"]

BASELINE_CPU_GB = 0.60
"""The stage process before any model: Python, torch, transformers, pandas, pyarrow (measured at prepare_data:
0.60 GB with CPU-only torch)."""
TRACKING_CPU_GB = 0.10
"""What MLflow tracking adds to the baseline (0.70 GB measured at prepare_data with tracking on)."""
CUDA_CONTEXT_CPU_GB = 0.45
"""What initialising CUDA adds to the process's RSS (the driver's and torch's host-side state)."""
ACT_H, ACT_KV, ACT_FFN = 7, 2, 3
"""Saved activations per token and decoder layer for backward, in hidden, kv (kv_heads x head_dim) and
intermediate widths: norms' inputs and outputs, q/k/v and their rotated copies, the attention output, the MLP's
gate, up, activation and product (`trainer_items`). Fitted on SmolLM2-135M with large frees returned to the system
(`pipeline.memory.measure.return_large_frees`): SFT and GFT with micro-batches of 8 x 396 tokens, GRPO 8 x 188
(docs/memory.md)."""
STEP_COPIES = 0.75
"""Parameter-sized temporaries of the optimizer step and the save (AdamW's foreach intermediates, the state dict
written), beside the trainer's state: they come after backward has freed the micro-batch's activations, so a
stage holds the larger of the two (0.40 GB above the state in SmolLM2-135M's checkpointed GRPO round)."""
LOGIT_BLOCKS = 1
"""[chunk, vocab] float32 blocks alive at once in the chunked log-prob beyond what the activations count
(`pipeline.model.logprobs`: one chunk's logits; its log-softmax and gradient reuse freed blocks)."""
DECODE_LOGIT_BLOCKS = 4
"""[rows, vocab] float32 blocks alive in one decoding step (logits, warped scores, probabilities, the draw)."""


@dataclass(frozen=True)
class Item:
    """One part of a stage's peak: what it is and its size in GB."""

    name: str
    gb: float


@dataclass(frozen=True)
class Where:
    """Where the parts live, and the longest rendered prompt (tokens) when it is known."""

    cuda: bool
    prompt_tokens: int | None
    baseline_gb: float = BASELINE_CPU_GB + TRACKING_CPU_GB


@dataclass
class Phase:
    """One phase of a stage (sampling, scoring, training): its items by device ("cpu", "cuda")."""

    name: str
    items: dict[str, list[Item]] = field(default_factory=lambda: {"cpu": [], "cuda": []})

    def add(self, device: str, name: str, nbytes: float) -> Phase:
        """Add an item of `nbytes` (nothing when it is empty)."""
        if nbytes > 0:
            self.items[device].append(Item(name, nbytes / GB))
        return self

    def total(self, device: str) -> float:
        return sum(i.gb for i in self.items[device])


def _engine_dtype(cfg: EngineConfig, cuda: bool) -> int:
    return BYTES["bfloat16" if cuda else "float32"] if cfg.dtype == "auto" else BYTES[cfg.dtype]


def prompt_len(where: Where, engine: EngineConfig, max_new_tokens: int) -> int:
    """The longest prompt: the rendered prompts' when known, else the most engine.max_model_len leaves."""
    bound = max(engine.max_model_len - max_new_tokens, 1)
    return bound if where.prompt_tokens is None else min(where.prompt_tokens, bound)


def engine_items(phase: Phase, role: str, shape: ModelShape, engine: EngineConfig, where: Where, *,
                 n: int = 0, max_new_tokens: int = 0, prompts: int | None = None) -> Phase:
    """An engine's weights and, when it samples (`n` > 0), its decoding working set: the KV cache of
    batch_size x n rows of prompt + max_new_tokens tokens and one step's [rows, vocab] blocks. vLLM reserves its
    own: gpu_memory_utilization of the GPU (not modelled: its weights and a KV cache of kv_cache_gib on CPU)."""
    device = "cuda" if where.cuda else "cpu"
    nbytes = _engine_dtype(engine, where.cuda)
    phase.add(device, f"{role} engine weights", shape.params * nbytes)
    if engine.backend == "vllm":
        return phase.add(device, f"{role} engine KV cache (vLLM kv_cache_gib)", engine.kv_cache_gib * 2**30)
    if n <= 0:
        return phase
    rows = min(engine.batch_size, prompts or engine.batch_size) * n
    tokens = prompt_len(where, engine, max_new_tokens) + max_new_tokens
    kv = rows * tokens * shape.kv_bytes_per_token(nbytes)
    phase.add(device, f"{role} KV cache ({rows} rows x {tokens} tokens)", kv)
    return phase.add(device, f"{role} decoding logits ({rows} rows)", DECODE_LOGIT_BLOCKS * rows * shape.vocab * 4)


def trainer_items(phase: Phase, shape: ModelShape, train: TrainConfig, where: Where, *, rows: int,
                  tokens: int, scored: int) -> Phase:
    """The trainer's state (master weights, gradients, AdamW's two moments, in master_dtype) and the larger of one
    micro-batch's working set (saved activations of `rows` x `tokens` (prompt + response) for backward, one layer's
    only under gradient checkpointing, and the chunked log-prob's [chunk, vocab] blocks over the `scored` response
    tokens) and the optimizer step's temporaries, which come after backward has freed that set."""
    device = "cuda" if where.cuda else "cpu"
    master = BYTES[train.master_dtype]
    p = shape.params
    phase.add(device, "trainer weights", p * master).add(device, "gradients", p * master)
    phase.add(device, "AdamW moments", 2 * p * master)
    act = BYTES["bfloat16"] if where.cuda and train.precision != "fp32" else master
    per_layer = ACT_H * shape.hidden + ACT_KV * shape.kv_heads * shape.head_dim + ACT_FFN * shape.intermediate
    layers = 1 if train.gradient_checkpointing else shape.layers
    saved = rows * tokens * (per_layer * layers + (shape.layers * shape.hidden if train.gradient_checkpointing else 0))
    chunk = min(train.logprob_chunk_size, max(scored, 1))
    working = [(f"activations ({rows} x {tokens} tokens)", saved * act),
               (f"logits chunks ({chunk} x {shape.vocab})", LOGIT_BLOCKS * chunk * shape.vocab * 4)]
    if train.keep_logits:
        working.append(("kept logits", scored * shape.vocab * act))
    step = STEP_COPIES * p * master
    if step > sum(nbytes for _, nbytes in working):  # the step runs once backward has freed the working set
        return phase.add(device, "optimizer step and save transients", step)
    for name, nbytes in working:
        phase.add(device, name, nbytes)
    return phase


SCORING_CHUNK_BYTES = 64 * 2**20
"""score_responses' float32 logits per chunk (`pipeline.model.scoring.SCORING_CHUNK_BYTES`)."""


def scoring_chunk_rows(vocab: int) -> int:
    """Rows per scoring chunk (`pipeline.model.scoring.scoring_chunk_rows`: 64 MiB of float32 logits, at most
    2048 rows)."""
    return max(1, min(2048, SCORING_CHUNK_BYTES // (4 * vocab)))


def scoring_items(phase: Phase, who: str, shape: ModelShape, where: Where, *, rows: int, tokens: int) -> Phase:
    """A scoring model (in its checkpoint's dtype) and one scored batch's forward without gradients: one layer's
    transients and the chunked log-prob's blocks (`pipeline.model.scoring.score_responses`: 16 rows a batch)."""
    device = "cuda" if where.cuda else "cpu"
    nbytes = BYTES[shape.dtype]
    phase.add(device, f"{who} scoring model", shape.params * nbytes)
    per_token = 4 * shape.hidden + 3 * shape.intermediate + shape.heads * tokens
    phase.add(device, f"{who} scoring forward ({rows} x {tokens} tokens)", rows * tokens * per_token * nbytes)
    chunk = min(scoring_chunk_rows(shape.vocab), rows * tokens)
    return phase.add(device, f"{who} scoring logits ({chunk} x {shape.vocab})", LOGIT_BLOCKS * chunk * shape.vocab * 4)
