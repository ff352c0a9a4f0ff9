"""The built-in task of the embedded default: multi-step arithmetic word problems, a character tokenizer and
tiny Qwen2 models trained here, so a whole pipeline run needs no model hub.

A problem of level k takes k arithmetic steps ("ann has 8 cups. gives away 3. finds 5. how many now?"); its
solution writes one line per step and ends in `\\boxed{answer}` ("8-3=5\\n5+5=10\\n\\boxed{10}"). Numbers stay
small (every value in [0, 20]) and texts short: the models read one token per character.

The teacher and base are trained from these by `pipeline.rounds.bootstrap`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from pipeline.config import SyntheticConfig

if TYPE_CHECKING:  # transformers costs seconds to import: the functions that build models import it
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

__all__ = ["ALPHABET", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "make_problems", "build_tokenizer", "build_model",
           "split_problems"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------

_NAMES = ("ann", "bob", "cal", "dee", "eve", "max")
_OBJECTS = ("pens", "cats", "eggs", "cups", "hats", "coins")
_PHRASES = {"+": ("gets {}.", "finds {}."), "-": ("loses {}.", "gives away {}.")}
# Small on purpose: every value stays in [0, 20] and a step adds or takes away 1-5 (or doubles a value of
# at most 10), so a 0.5M-parameter model learns the facts and the look-ups within the bootstrap's budget.
_MAX_START, _MAX_VALUE, _MAX_OPERAND = 12, 20, 5


def _step(rng: random.Random, value: int) -> tuple[str, str, int]:
    """One step from `value`: (sentence, operator, operand); the operator is uniform over those that keep
    the result in [0, _MAX_VALUE]."""
    ops = [op for op, ok in (("+", value < _MAX_VALUE), ("-", value > 0), ("*", 0 < 2 * value <= _MAX_VALUE)) if ok]
    op = rng.choice(ops)
    if op == "*":
        return "doubles them.", "*", 2
    operand = rng.randint(1, min(_MAX_OPERAND, _MAX_VALUE - value if op == "+" else value))
    return rng.choice(_PHRASES[op]).format(operand), op, operand


def _problem(rng: random.Random, level: int) -> tuple[str, str, int]:
    """One problem of `level` steps: (prompt, step-by-step solution, answer)."""
    name, obj, value = rng.choice(_NAMES), rng.choice(_OBJECTS), rng.randint(2, _MAX_START)
    sentences, lines = [f"{name} has {value} {obj}."], []
    for _ in range(level):
        sentence, op, operand = _step(rng, value)
        new = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        sentences.append(sentence)
        lines.append(f"{value}{op}{operand}={new}")
        value = new
    sentences.append("how many now?")
    return " ".join(sentences), "\n".join(lines + [f"\\boxed{{{value}}}"]), value


def make_problems(n: int, *, seed: int, levels: Sequence[int] = (1, 2, 3)) -> list[dict]:
    """`n` problems, levels taking turns in the given order; row i depends only on (seed, i, its level),
    so a longer list extends a shorter one. Rows: id, prompt, solution, answer (a string), level."""
    if n < 0 or not levels or any(level < 1 for level in levels):
        raise ValueError(f"need n >= 0 and levels >= 1, got n={n}, levels={list(levels)}")
    rows = []
    for i in range(n):
        level = int(levels[i % len(levels)])
        rng = random.Random(f"synthetic-{seed}-{i}")  # str seeds hash with sha512: stable across processes
        prompt, solution, answer = _problem(rng, level)
        rows.append({"id": f"syn-{seed}-{i}", "prompt": prompt, "solution": solution, "answer": str(answer),
                     "level": level})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and models
# ---------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0, 1, 2, 3
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 \n+-*/=?.,:;!'()\\{}$^_"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}q: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}a: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' ~ m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}a: {% endif %}"
)


def build_tokenizer() -> "PreTrainedTokenizerFast":
    """One token per character of `ALPHABET` (anything else is <unk>), left padding, and a chat template that
    renders a prompt as "<bos>q: {prompt}\\na: " and an assistant turn as "a: {content}<eos>"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # any char, \n too
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", model_max_length=256)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# hidden, ffn, layers, heads, kv heads: 0.50M parameters. Measured on the 2-core CPU, a 3-layer h160 teacher
# (1.16M) learned no faster per step at twice the step time, so the teacher is this shape trained longer.
_SIZES = {"base": (128, 512, 2, 4, 2), "teacher": (128, 512, 2, 4, 2)}


def build_model(tokenizer: "PreTrainedTokenizerFast", *, size: Literal["base", "teacher"],
                seed: int) -> "Qwen2ForCausalLM":
    """A randomly initialised tiny Qwen2 (tied embeddings) over the tokenizer's vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, ffn, layers, heads, kv_heads = _SIZES[size]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():  # the caller's global RNG state is left as it was
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _take_new(rows: Sequence[dict], n: int, seen: set[str]) -> list[dict]:
    """Up to `n` rows in order, levels in equal shares, none with a prompt in `seen` (which grows)."""
    levels = sorted({r["level"] for r in rows})
    per_level = -(-n // max(len(levels), 1))  # ceil
    taken, counts = [], dict.fromkeys(levels, 0)
    for row in rows:
        if len(taken) < n and counts[row["level"]] < per_level and row["prompt"] not in seen:
            seen.add(row["prompt"])
            taken.append(row)
            counts[row["level"]] += 1
    return taken


def split_problems(cfg: SyntheticConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, dev, held_out): the first `n_train` rows, then `n_dev` rows that pick the base checkpoint and
    `n_eval` rows that measure both models; dev and held-out prompts are distinct and never trained on."""
    rows = make_problems(cfg.n_train + 4 * (cfg.n_eval + cfg.n_dev), seed=cfg.seed, levels=cfg.levels)
    train, seen = rows[:cfg.n_train], {r["prompt"] for r in rows[:cfg.n_train]}
    held_out = _take_new(rows[cfg.n_train:], cfg.n_eval, seen)
    dev = _take_new(rows[cfg.n_train:], cfg.n_dev, seen)
    if not held_out or not dev:
        raise ValueError(f"no held-out problems: the {cfg.n_train} training rows hold every prompt of levels "
                         f"{list(cfg.levels)} among the candidates; lower n_train or add levels")
    return train, dev, held_out
