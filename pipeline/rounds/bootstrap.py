"""The embedded default's teacher and base, pretrained here on the built-in task (`pipeline.data.synthetic`).

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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from pipeline.config import SyntheticConfig, TrainConfig
from pipeline.data.synthetic import build_model, build_tokenizer, split_problems
from pipeline.model.batches import Example
from pipeline.model.scoring import sft_objective
from pipeline.model.loop import fit
from pipeline.model.trainer import Trainer, make_trainer, save_model
from pipeline.rollout.verifiers import Unscorable, math_answer

__all__ = ["BootstrapResult", "tokenize_example", "greedy_accuracy", "bootstrap"]

log = logging.getLogger(__name__)


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
