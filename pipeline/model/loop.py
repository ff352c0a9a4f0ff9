"""The one step loop: `run_steps` takes optimizer steps from a sequence of step plans; `fit` (SFT, the bootstrap)
and both round types (`pipeline.rounds.gft`, `pipeline.rounds.grpo`) are this loop over different plans.

A `StepPlan` is one optimizer step: the examples, the indices of the step's global batch, and the fields its
history row carries (round, iteration, minibatch). Every process sees the same plan and takes its strided share
(`plan_step`), so the data order is a pure function of the plan and a checkpoint resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import set_seed
from torch import nn

from pipeline.config import TrainConfig
from pipeline.model.batches import Example, check_example, plan_step, step_order
from pipeline.model.scoring import Objective
from pipeline.model.checkpoint import resume_latest, save_checkpoint
from pipeline.model.trainer import Trainer, make_trainer, train_step
from pipeline.progress import bar as progress_bar_of

__all__ = ["StepPlan", "run_steps", "FitResult", "fit", "total_steps"]


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: the global batch `indices` into `examples`, and the fields of its history row."""

    examples: Sequence[Example]
    indices: Sequence[int]
    tags: dict[str, float] = field(default_factory=dict)


def run_steps(trainer: Trainer, plans: Iterable[StepPlan], objective: Objective, cfg: TrainConfig, *,
              pad_id: int, after_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """One optimizer step per plan, continuing `trainer.progress.step`; one history row per step
    ({"step", **plan.tags, **metrics}), handed to `after_step` as it is made."""
    acc, history = trainer.accelerator, []
    for plan in plans:
        step = trainer.progress.step
        micro, totals = plan_step(plan.examples, plan.indices, cfg, rank=acc.process_index, world=acc.num_processes,
                                  pad_id=pad_id)
        result = train_step(trainer, micro, objective, totals, max_grad_norm=cfg.max_grad_norm, step=step)
        trainer.progress.step = step + 1
        row = {"step": float(step + 1), **plan.tags, **result.metrics}
        history.append(row)
        if after_step is not None:
            after_step(row)
    return history


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    return cfg.num_steps or max(1, math.ceil(cfg.epochs * n_examples / cfg.sequences_per_step))


@dataclass
class FitResult:
    """The trainer (its `.model` is the trained model), per-step metrics of this call, of the whole run (the
    resumed checkpoint's history first), and the last checkpoint."""

    trainer: Trainer
    history: list[dict[str, float]]
    checkpoint: Path | None
    full_history: list[dict[str, float]] = field(default_factory=list)


def _epoch_plans(trainer: Trainer, examples: Sequence[Example], cfg: TrainConfig, end: int) -> Iterator[StepPlan]:
    """Steps from the trainer's current step (after a resume) to `end`: slices of one seeded permutation per epoch."""
    while trainer.progress.step < end:
        yield StepPlan(examples, step_order(len(examples), trainer.progress.step, cfg.sequences_per_step, cfg.seed))


def fit(model: nn.Module, examples: Sequence[Example], objective: Objective, cfg: TrainConfig, *,
        pad_id: int, checkpoint_dir: Path | None = None, stop_at_step: int | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None, progress_bar: bool = True) -> FitResult:
    """Train `model` on `examples` for the configured steps, resuming from `checkpoint_dir` when it holds one.

    `stop_at_step` ends this call early (as a preemption would) without changing the schedule.
    """
    for i, ex in enumerate(examples):
        check_example(i, ex)
    set_seed(cfg.seed)
    steps = total_steps(cfg, len(examples))
    trainer = make_trainer(model, cfg, steps)
    last, earlier = resume_latest(trainer, checkpoint_dir) if checkpoint_dir is not None else (None, [])
    end = min(steps, stop_at_step or steps)
    bar = progress_bar_of(total=end, initial=trainer.progress.step, desc="train",
                          disable=not (progress_bar and trainer.accelerator.is_main_process))

    history: list[dict[str, float]] = []

    def after_step(row: dict[str, float]) -> None:
        nonlocal last
        history.append(row)
        done = int(row["step"])
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", gnorm=f"{row['grad_norm']:.3f}")
        if on_step is not None and trainer.accelerator.is_main_process and done % cfg.log_every == 0:
            on_step(done, {k: v for k, v in row.items() if k != "step"})
        if checkpoint_dir is not None and (done == end or (cfg.save_every is not None and done % cfg.save_every == 0)):
            last = save_checkpoint(trainer, checkpoint_dir, earlier + history, keep=cfg.keep_checkpoints)

    run_steps(trainer, _epoch_plans(trainer, examples, cfg, end), objective, cfg, pad_id=pad_id,
              after_step=after_step)
    bar.close()
    return FitResult(trainer=trainer, history=history, checkpoint=last, full_history=earlier + history)
