"""Shared fixtures: offline hubs, one torch thread, tiny random causal LMs built in code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random

import pytest
import torch

torch.set_num_threads(1)

VOCAB = 61
PAD = 0


def tiny_lm(kind: str = "qwen2", *, seed: int = 0, dtype: torch.dtype = torch.float32, dropout: float = 0.0,
            vocab: int = VOCAB):
    """A 2-layer random causal LM (Qwen2 or Llama), a few thousand parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[kind]
    cfg = config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=(kind == "qwen2"), attention_dropout=dropout, pad_token_id=PAD,
                     bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(cfg).to(dtype)


def random_examples(n: int, *, seed: int = 0, vocab: int = VOCAB, per_token: bool = False,
                    max_prompt: int = 6, max_response: int = 9):
    from pipeline.model.batches import Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_prompt))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_response))]
        adv = [rng.gauss(0, 1) for _ in response] if per_token else rng.gauss(0, 1)
        out.append(Example(prompt, response, adv))
    return out


@pytest.fixture
def examples():
    return random_examples(16)
