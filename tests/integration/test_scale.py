"""The 7B recipe (configs/paper_gpu_7b.toml) and the sizing docs/scale.md states for it: the config loads with the
project's loader, its launch and engine settings are the ones the docs size (FSDP2 over the node's GPUs, vLLM
tensor parallelism the model's heads allow, sleep mode), and every figure of the docs' sizing tables is recomputed
here from Qwen2.5-Math-7B's published shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import RunConfig, load_toml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "paper_gpu_7b.toml"
GB = 1e9
GPU_GB = 80  # the recipe's cards (H100/A100 80 GB)


@dataclass(frozen=True)
class Shape:
    """Qwen2.5-Math-7B's config.json (Qwen2.5-7B's shape): untied embeddings, biases on q, k and v."""

    hidden: int = 3584
    layers: int = 28
    intermediate: int = 18944
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 152064

    @property
    def layer_params(self) -> int:
        q = self.hidden * self.heads * self.head_dim + self.heads * self.head_dim
        kv = 2 * (self.hidden * self.kv_heads * self.head_dim + self.kv_heads * self.head_dim)
        o = self.heads * self.head_dim * self.hidden
        return q + kv + o + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def root_params(self) -> int:
        """Embeddings, output projection (untied) and final norm: what FSDP2's root gathers."""
        return 2 * self.vocab * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


QWEN7B = Shape()
TOKENS = 2048 + 512  # the paper's responses and a prompt of up to 512 tokens


def _recipe() -> RunConfig:
    """The recipe's settings as written (its hub model ids are not resolved: no machine here has them cached)."""
    return load_toml(RunConfig, RECIPE)


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _training_per_gpu(shape: Shape, processes: int, micro_batch: int, chunk: int) -> dict[str, float]:
    """The docs' per-GPU table of a training job (bytes): sharded state, gathered params, activations."""
    recompute = (3 * shape.intermediate + 10 * shape.hidden) * 2 * TOKENS  # one layer, one sequence, bf16
    return {"state": 16 * shape.params / processes,
            "layers": 2 * 2 * shape.layer_params,
            "root": (2 + 4) * shape.root_params,
            "checkpoints": micro_batch * shape.layers * TOKENS * shape.hidden * 2,
            "recompute": 2 * micro_batch * recompute,
            "logits": 3 * chunk * shape.vocab * 4}


@pytest.fixture(scope="module")
def docs() -> str:
    text = (ROOT / "docs" / "scale.md").read_text()
    return text[text.index("## Sizing the paper's 7B runs"):]


def test_the_parameter_count_is_the_published_one(docs):
    assert QWEN7B.layer_params == 233_057_792 and QWEN7B.params == 7_615_616_512  # "7.62B" on the model card
    assert f"{QWEN7B.params:,} parameters" in docs and f"{QWEN7B.layer_params:,}" in docs


def test_the_docs_state_the_computed_memory(docs):
    p = QWEN7B.params
    for figure in (_gb(2 * p), _gb(4 * p), _gb(8 * p), _gb(16 * p), f"{16 * p / 2**30:.1f} GiB",
                   f"{_gb(16 * p / 4).removesuffix(' GB')} / {_gb(16 * p / 8)} per GPU",
                   f"{QWEN7B.kv_bytes_per_token:,}", f"{QWEN7B.kv_bytes_per_token // 4:,} per GPU at TP 4",
                   f"{_gb(512 * TOKENS * QWEN7B.kv_bytes_per_token)}, "
                   f"{_gb(512 * TOKENS * QWEN7B.kv_bytes_per_token / 4)} per GPU at TP 4",
                   f"{QWEN7B.layers * TOKENS * QWEN7B.hidden * 2 / GB:.3f} GB",
                   f"{1024 * QWEN7B.vocab * 4 / GB:.3f} GB"):
        assert figure in docs, figure


@pytest.mark.parametrize("processes", [4, 8])
def test_a_training_gpu_fits_as_the_docs_say(docs, processes):
    cfg = _recipe()
    parts = _training_per_gpu(QWEN7B, processes, cfg.gft.train.micro_batch_size, cfg.gft.train.logprob_chunk_size)
    total = sum(parts.values())
    assert f"**{_gb(total)}**" in docs and _gb(parts["state"]) in docs and _gb(parts["recompute"]) in docs
    assert total < 0.7 * GPU_GB * GB  # room left for the sleeping engines' contexts and fragmentation
    assert 16 * QWEN7B.params / GB > GPU_GB  # and one GPU alone could not hold the state: sharding is needed


def test_the_recipe_shards_training_and_sleeps_a_tensor_parallel_engine():
    cfg = _recipe()
    assert cfg.models.base == "Qwen/Qwen2.5-Math-7B" and list(cfg.chain) == ["sft", "gft"]
    for train in (cfg.sft.train, cfg.gft.train):
        assert (train.launch.processes, train.launch.nodes, train.launch.strategy) == (4, 1, "fsdp")
        assert train.gradient_checkpointing and train.precision == "bf16"
    engine = cfg.engine
    tp = engine.tensor_parallel_size
    assert engine.backend == "vllm" and engine.enable_sleep_mode and engine.data_parallel_size == 1
    assert tp == cfg.gft.train.launch.processes  # one engine shard and one training process per GPU
    assert QWEN7B.heads % tp == 0 and (QWEN7B.kv_heads % tp == 0 or tp % QWEN7B.kv_heads == 0)  # vLLM's rule
    assert QWEN7B.heads % 8 != 0  # why the 8-GPU variant keeps the engine at TP 4
    assert engine.max_model_len >= TOKENS + 512 and cfg.gft.max_response_tokens == 2048


def test_the_engine_holds_a_round_s_samples_at_once(docs):
    """Two engines awake at gpu_memory_utilization each: weights, ~3 GB of activations and graphs, the rest KV."""
    cfg = _recipe()
    engine, tp = cfg.engine, cfg.engine.tensor_parallel_size
    weights = 2 * QWEN7B.params / tp
    kv = engine.gpu_memory_utilization * GPU_GB * GB - weights - 3 * GB
    sequences = kv / (QWEN7B.kv_bytes_per_token / tp) / TOKENS
    assert 2 * engine.gpu_memory_utilization < 1 and sequences > cfg.gft.prompts_per_round * cfg.gft.policy
    assert f"{weights / GB:.2f} GB of bf16 weights per GPU" in docs
    assert f"about {kv / GB:.0f} GB of KV cache per GPU" in docs and f"{int(sequences)} sequences" in docs
