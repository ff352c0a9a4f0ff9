"""The built-in task of the embedded default: multi-step arithmetic word problems, a character tokenizer and
tiny Qwen2 models trained here, so a whole pipeline run needs no model hub.

A problem of level k takes k arithmetic steps ("ann has 8 cups. gives away 3. finds 5. how many now?"); its
solution writes one line per step and ends in `\\boxed{answer}` ("8-3=5\\n5+5=10\\n\\boxed{10}"). Numbers stay
small (every value in [0, 20]) and texts short: the models read one token per character.

`bootstrap` pretrains with SFT from scratch, in one run: the teacher is the run's end, the base policy a copy
taken on the way, at the first probe whose greedy accuracy on dev problems reaches a target (a probe rather
than a fixed step, because the step at which accuracy takes off varies by hundreds from seed to seed). So the
teacher solves most held-out problems while the base solves some of every level, and sampled groups hold both
right and wrong answers (group advantages are not all zero). Both are saved as Hugging Face folders (model +
tokenizer) and scored by greedy decoding with `math_answer`.
"""

from __future__ import annotations

import copy
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
from pipeline.batches import Example
from pipeline.scoring import sft_objective
from pipeline.training import Trainer, fit, make_trainer, save_model

__all__ = ["ALPHABET", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "BootstrapResult", "make_problems", "build_tokenizer",
           "build_model", "tokenize_example", "greedy_accuracy", "split_problems", "bootstrap"]

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


# hidden, ffn, layers, heads, kv heads: 0.50M parameters. Measured on the 2-core CPU, a 3-layer h160 teacher
# (1.16M) learned no faster per step at twice the step time, so the teacher is this shape trained longer.
_SIZES = {"base": (128, 512, 2, 4, 2), "teacher": (128, 512, 2, 4, 2)}


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
    with torch.random.fork_rng():  # the caller's global RNG state is left as it was
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


def _train_config(cfg: SyntheticConfig) -> TrainConfig:
    return TrainConfig(lr=cfg.lr, betas=(0.9, 0.98), schedule="cosine", warmup_steps=cfg.warmup_steps,
                       num_steps=cfg.teacher_steps, sequences_per_step=cfg.batch_size,
                       micro_batch_size=cfg.batch_size, precision="fp32", seed=cfg.seed)


def _max_new_tokens(tokenizer, rows: Sequence[dict]) -> int:
    return max(len(tokenizer(r["solution"], add_special_tokens=False).input_ids) for r in rows) + 8


@dataclass
class _BasePick:
    """The base checkpoint: a copy of the model at the first probe that reaches the target."""

    step: int = 0
    dev_accuracy: float = 0.0
    seconds: float = 0.0
    model: Qwen2ForCausalLM | None = None


def _base_picker(model, tokenizer, dev_rows: list[dict], cfg: SyntheticConfig, pick: _BasePick):
    """An `on_step` callback: every `probe_every` steps until `base_steps`, greedy accuracy on the dev rows;
    the first step that reaches `base_accuracy` (or `base_steps` itself) is copied into `pick`. Greedy decoding
    draws no random numbers, so the training run is the same with or without probes."""
    start, max_new = time.perf_counter(), _max_new_tokens(tokenizer, dev_rows)

    def on_step(step: int, _metrics: dict[str, float]) -> None:
        if pick.model is not None or (step % cfg.probe_every and step != cfg.base_steps):
            return
        accuracy = greedy_accuracy(model, tokenizer, dev_rows, max_new_tokens=max_new)["accuracy"]
        log.info("base probe at step %d: dev accuracy %.3f", step, accuracy)
        if accuracy >= cfg.base_accuracy or step >= cfg.base_steps:
            pick.step, pick.dev_accuracy, pick.seconds = step, accuracy, time.perf_counter() - start
            pick.model = copy.deepcopy(model)
    return on_step


def _finish(trainer: Trainer, tokenizer, eval_rows: list[dict], name: str, out: Path) -> dict[str, float]:
    """Save the trained model with the tokenizer under `out`; held-out metrics prefixed by `name`."""
    save_model(trainer, out, tokenizer)
    start = time.perf_counter()
    max_new = _max_new_tokens(tokenizer, eval_rows)
    metrics = greedy_accuracy(trainer.model, tokenizer, eval_rows, max_new_tokens=max_new)
    metrics |= {"params": float(sum(p.numel() for p in trainer.model.parameters())),
                "eval_seconds": time.perf_counter() - start}
    log.info("%s: %s", name, {k: round(v, 3) for k, v in metrics.items()})
    return {f"{name}/{key}": value for key, value in metrics.items()}


def bootstrap(out_dir: Path, cfg: SyntheticConfig) -> BootstrapResult:
    """Pretrain one model on `cfg.n_train` problems for `teacher_steps` (the teacher, out_dir/"teacher");
    the base (out_dir/"base") is the same run at the first probe whose dev accuracy reaches `base_accuracy`,
    at the latest at `base_steps`. Both are scored by greedy decoding on the held-out problems."""
    out_dir, start = Path(out_dir), time.perf_counter()
    tokenizer = build_tokenizer()
    train_rows, dev_rows, eval_rows = split_problems(cfg)
    examples = [tokenize_example(tokenizer, row) for row in train_rows]
    model = build_model(tokenizer, size="base", seed=cfg.seed)  # same shape as "teacher"
    pick, train_cfg, fit_start = _BasePick(), _train_config(cfg), time.perf_counter()
    run = fit(model, examples, sft_objective(), train_cfg, pad_id=tokenizer.pad_token_id, progress_bar=False,
              on_step=_base_picker(model, tokenizer, dev_rows, cfg, pick))
    metrics = {"n_train": float(len(train_rows)), "n_dev": float(len(dev_rows)), "n_eval": float(len(eval_rows)),
               "teacher/steps": float(run.trainer.progress.step), "teacher/final_loss": run.history[-1]["loss"],
               "teacher/train_seconds": time.perf_counter() - fit_start, "base/steps": float(pick.step),
               "base/train_seconds": pick.seconds, "base/dev_accuracy": pick.dev_accuracy}
    metrics |= _finish(run.trainer, tokenizer, eval_rows, "teacher", out_dir / "teacher")
    base_trainer = make_trainer(pick.model, train_cfg, total_steps=1)  # only to save through save_model
    metrics |= _finish(base_trainer, tokenizer, eval_rows, "base", out_dir / "base")
    metrics["wall_seconds"] = time.perf_counter() - start
    return BootstrapResult(teacher_dir=out_dir / "teacher", base_dir=out_dir / "base", metrics=metrics)
