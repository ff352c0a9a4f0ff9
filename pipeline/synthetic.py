"""The built-in task of the embedded default: multi-step arithmetic word problems, a character tokenizer and
tiny Qwen2 models trained here, so a whole pipeline run needs no model hub.

A problem of level k takes k arithmetic steps ("ann has 23 pens. she gets 15 more. she gives away 8. how many
pens now?"); its solution writes one line per step and ends in `\\boxed{answer}` ("23+15=38\\n38-8=30\\n
\\boxed{30}"). Every intermediate result stays in [0, 99], so the model only ever does 2-digit arithmetic.

`bootstrap` pretrains two models from scratch with SFT on these solutions: a teacher that solves most
held-out problems and a deliberately weaker base policy (smaller and trained for fewer steps), so that
sampled groups hold both right and wrong answers and group advantages are not all zero. It saves both as
Hugging Face folders (model + tokenizer) and measures their greedy held-out accuracy with `math_answer`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from pipeline.config import SyntheticConfig, TrainConfig
from pipeline.rewards import Unscorable, math_answer
from pipeline.training import Example, fit, save_model, sft_objective

__all__ = ["ALPHABET", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "BootstrapResult", "make_problems", "build_tokenizer",
           "build_model", "tokenize_example", "greedy_accuracy", "bootstrap"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------

_NAMES = (("ann", "she"), ("bob", "he"), ("cal", "he"), ("dee", "she"), ("eve", "she"), ("max", "he"))
_OBJECTS = ("pens", "cats", "eggs", "cups", "hats", "coins")
_MAX_VALUE = 99  # every intermediate result stays a 1-2 digit number
_MAX_OPERAND = 9  # added or taken away: one digit, so each step carries or borrows at most once


def _steps(value: int) -> list[tuple[str, str, int]]:
    """The steps possible from `value`: (sentence with {p} = pronoun, operator, operand)."""
    out = [(f"{{p}} gets {b} more.", "+", b) for b in range(1, _MAX_OPERAND + 1) if value + b <= _MAX_VALUE]
    out += [(f"{{p}} finds {b} more.", "+", b) for b in range(1, _MAX_OPERAND + 1) if value + b <= _MAX_VALUE]
    out += [(f"{{p}} gives away {b}.", "-", b) for b in range(1, _MAX_OPERAND + 1) if b <= value]
    out += [(f"{{p}} loses {b}.", "-", b) for b in range(1, _MAX_OPERAND + 1) if b <= value]
    if value * 2 <= _MAX_VALUE:
        out += [("{p} doubles them.", "*", 2)] * 6  # weight: about as likely as one additive phrasing
    return out


def _problem(rng: random.Random, level: int) -> tuple[str, str, int]:
    """One problem of `level` steps: (prompt, step-by-step solution, answer)."""
    (name, pronoun), obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    value = rng.randint(2, 59)
    sentences, lines = [f"{name} has {value} {obj}."], []
    for _ in range(level):
        sentence, op, operand = rng.choice(_steps(value))
        new = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        sentences.append(sentence.format(p=pronoun))
        lines.append(f"{value}{op}{operand}={new}")
        value = new
    sentences.append(f"how many {obj} now?")
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


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of `ALPHABET` (anything else is <unk>), left padding, and a chat template that
    renders a prompt as "<bos>q: {prompt}\\na: " and an assistant turn as "a: {content}<eos>"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

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


# hidden, ffn, layers, heads, kv heads: base ~0.5M parameters, teacher ~1.1M (measured in the tests)
_SIZES = {"base": (128, 512, 2, 4, 2), "teacher": (160, 640, 3, 4, 2)}


def build_model(tokenizer: PreTrainedTokenizerFast, *, size: Literal["base", "teacher"],
                seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised tiny Qwen2 (tied embeddings) over the tokenizer's vocabulary."""
    hidden, ffn, layers, heads, kv_heads = _SIZES[size]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------------
# Training data and evaluation
# ---------------------------------------------------------------------------------------------------------


def _prompt_text(tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def tokenize_example(tokenizer: PreTrainedTokenizerFast, row: dict) -> Example:
    """An SFT example exactly as the pipeline tokenizes text: the chat-templated prompt, then the solution
    without special tokens, then EOS."""
    prompt_ids = tokenizer(_prompt_text(tokenizer, row["prompt"]), add_special_tokens=False).input_ids
    response_ids = tokenizer(row["solution"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return Example(prompt_ids=prompt_ids, response_ids=response_ids)


def _score(response: str, row: dict) -> float:
    # math-verify's timeout needs signal.alarm (main thread only); these responses are short strings over a
    # small alphabet, so off the main thread (a Prefect worker) they are parsed without a timeout.
    timeout = 3 if threading.current_thread() is threading.main_thread() else None
    try:
        return math_answer(response, row, timeout_s=timeout)
    except Unscorable:
        return 0.0


@torch.no_grad()
def greedy_accuracy(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: Sequence[dict], *,
                    batch_size: int = 128, max_new_tokens: int = 48) -> dict[str, float]:
    """Greedy held-out accuracy with `math_answer`: overall ("accuracy") and per level ("accuracy_level{k}")."""
    was_training = model.training
    model.eval()
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        enc = tokenizer([_prompt_text(tokenizer, r["prompt"]) for r in batch], add_special_tokens=False,
                        padding=True, return_tensors="pt")  # left-padded [B, P]
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)  # [B, P + new]
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        scores += [_score(text, row) for text, row in zip(texts, batch)]
    model.train(was_training)
    metrics = {"accuracy": sum(scores) / max(len(scores), 1)}
    for level in sorted({r["level"] for r in rows}):
        mine = [s for s, r in zip(scores, rows) if r["level"] == level]
        metrics[f"accuracy_level{level}"] = sum(mine) / len(mine)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Bootstrap: pretrain teacher and base
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapResult:
    """The saved Hugging Face folders (model + tokenizer) and flat metrics ("teacher/accuracy", ...)."""

    teacher_dir: Path
    base_dir: Path
    metrics: dict[str, float]


def split_problems(cfg: SyntheticConfig) -> tuple[list[dict], list[dict]]:
    """Train rows, then held-out rows whose prompt never occurs in the train rows."""
    rows = make_problems(cfg.n_train + cfg.n_eval, seed=cfg.seed, levels=cfg.levels)
    train = rows[:cfg.n_train]
    seen = {r["prompt"] for r in train}
    return train, [r for r in rows[cfg.n_train:] if r["prompt"] not in seen]


def _pretrain(tokenizer, examples: list[Example], eval_rows: list[dict], cfg: SyntheticConfig,
              size: Literal["base", "teacher"], out: Path) -> dict[str, float]:
    """SFT one model from scratch, save it with the tokenizer under `out`, return its metrics."""
    steps = cfg.teacher_steps if size == "teacher" else cfg.base_steps
    model = build_model(tokenizer, size=size, seed=cfg.seed)
    train_cfg = TrainConfig(lr=cfg.lr, betas=(0.9, 0.98), schedule="cosine", warmup_steps=min(cfg.warmup_steps, steps),
                            num_steps=steps, sequences_per_step=cfg.batch_size, micro_batch_size=cfg.batch_size,
                            precision="fp32", seed=cfg.seed)
    start = time.perf_counter()
    result = fit(model, examples, sft_objective(), train_cfg, pad_id=tokenizer.pad_token_id, progress_bar=False)
    train_s = time.perf_counter() - start
    save_model(result.trainer, out, tokenizer)
    max_new = max(len(tokenizer(r["solution"]).input_ids) for r in eval_rows) + 8
    accuracy = greedy_accuracy(result.trainer.model, tokenizer, eval_rows, max_new_tokens=max_new)
    metrics = {"params": float(sum(p.numel() for p in model.parameters())), "steps": float(steps),
               "train_seconds": train_s, "eval_seconds": time.perf_counter() - start - train_s,
               "final_loss": result.history[-1]["loss"], **accuracy}
    log.info("%s: %s", size, {k: round(v, 3) for k, v in metrics.items()})
    return {f"{size}/{key}": value for key, value in metrics.items()}


def bootstrap(out_dir: Path, cfg: SyntheticConfig) -> BootstrapResult:
    """Pretrain the teacher and the base policy on `cfg.n_train` problems, save them under out_dir/"teacher"
    and out_dir/"base", and measure both on the held-out problems."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    train_rows, eval_rows = split_problems(cfg)
    examples = [tokenize_example(tokenizer, row) for row in train_rows]
    metrics = {"n_train": float(len(train_rows)), "n_eval": float(len(eval_rows))}
    metrics |= _pretrain(tokenizer, examples, eval_rows, cfg, "teacher", out_dir / "teacher")
    metrics |= _pretrain(tokenizer, examples, eval_rows, cfg, "base", out_dir / "base")
    metrics["wall_seconds"] = time.perf_counter() - start
    return BootstrapResult(teacher_dir=out_dir / "teacher", base_dir=out_dir / "base", metrics=metrics)
