"""Supervised fine-tuning on live objects: every prompt's expert (and teacher) responses as examples, trained by
the job's SFT phase (`pipeline.rounds.job`), in the stage's process or launched (`pipeline.rounds.launch.run`).

Off-policy text is tokenized exactly as a GFT group's expert and teacher members are (`groups.off_policy`), so
SFT and GFT train on the same tokens. SFT resumes from its work checkpoints (the job's `work` folder) after a kill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import LaunchConfig
from pipeline.data import chat
from pipeline.model.batches import Example
from pipeline.rounds import launch
from pipeline.rounds.groups import off_policy
from pipeline.rounds.job import TrainJob, write_examples

__all__ = ["SFTExamples", "sft_examples", "SFTResult", "fit_examples", "train_perf"]


@dataclass(frozen=True)
class SFTExamples:
    """The training examples, and how many responses the token budget cut."""

    examples: list[Example]
    truncated: int


def sft_examples(tok, rows: pd.DataFrame, teachers: dict[str, list[str]], max_tokens: int) -> SFTExamples:
    """Expert (and teacher) responses of every prompt as examples, cut at `max_tokens`."""
    examples, truncated = [], 0
    for pid, prompt, solution in zip(rows["id"], rows["prompt"], rows["solution"]):
        prompt_ids = chat.render_prompt(tok, prompt)
        members = off_policy(tok, str(pid), "expert", [solution], max_tokens)
        members += off_policy(tok, str(pid), "teacher", teachers.get(str(pid), []), max_tokens)
        truncated += sum(m.truncated for m in members)
        examples += [Example(prompt_ids, m.token_ids) for m in members]
    return SFTExamples(examples, truncated)


@dataclass(frozen=True)
class SFTResult:
    """This call's steps, the whole run's (a resumed fit: the checkpoint's steps first) and the stage's metrics."""

    history: list[dict[str, float]]
    full_history: list[dict[str, float]]
    metrics: dict[str, float]


def fit_examples(data: SFTExamples, job: TrainJob, launch_cfg: LaunchConfig, *, progress: bool = True,
                 asleep: Callable[[], AbstractContextManager] = nullcontext) -> SFTResult:
    """Write the examples into the job folder and run the job (model/ into `job.out`); the metrics: example
    counts, the final loss and the throughput of this call."""
    write_examples(Path(job.folder), data.examples)
    start = time.perf_counter()
    result = launch.run(job, launch_cfg, progress=progress, asleep=asleep)
    seconds = time.perf_counter() - start
    metrics = {"examples": float(len(data.examples)), "truncated_responses": float(data.truncated),
               "final_loss": result.full_history[-1]["loss"], **train_perf(result.history, seconds)}
    return SFTResult(result.history, result.full_history, metrics)


def train_perf(history: Sequence[dict[str, float]], seconds: float) -> dict[str, float]:
    """Training throughput of this call (model loading and checkpoints included), as the rounds log it."""
    tokens = sum(h.get("tokens", 0.0) for h in history)
    return {"perf/train_s": seconds, "perf/train_tokens": tokens, "perf/throughput": tokens / max(seconds, 1e-9),
            "perf/step_s": seconds / max(len(history), 1)}
