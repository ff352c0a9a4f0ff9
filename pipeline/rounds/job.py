"""A training job and the one function that runs it: load -> train -> save, for every training stage.

A `TrainJob` says what to load (the model folder, a round's `state/` to continue from, a GRPO round's reference
model), which phase to run (SFT's fit, a GFT round's train phase, a GRPO round's train phase), where its inputs
are (`examples.parquet`, or a round's `groups.parquet` and `prompt_ids.json`, in the job folder) and the folders
it writes: `out` (model/, and a round's state/) and `work` (SFT's resumable checkpoints). It is handed folders;
it knows nothing of the store that chose them.

`train(job)` loads, trains and saves. In the stage's process it is called directly (the one-process case); a
launched job (`pipeline.rounds.launch`) runs the same `train` in each of its processes. Every rule of a training
phase is written here once: the schedule's step count (`schedule_steps`), the round seed before a round's steps
(`groups.seed_round`), the save dtype (`loading.save_dtype`), the checkpoint layout (model/ and state/ in `out`)
and where optimizer state is loaded (`job.state`) and saved (`out/state`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict

from pipeline.config import GFTConfig, GRPOConfig, SFTConfig
from pipeline.data import chat
from pipeline.model.batches import Example
from pipeline.model.checkpoint import load_state, save_state
from pipeline.model.loading import load_model, save_dtype
from pipeline.model.loop import fit, total_steps
from pipeline.model.scoring import dft_objective, sft_objective
from pipeline.model.trainer import Trainer, make_trainer, save_model
from pipeline.rounds import gft, grpo
from pipeline.rounds.groups import seed_round
from pipeline.atomic import write_text_atomic

__all__ = ["Phase", "TrainJob", "JobResult", "Report", "train", "round_steps", "schedule_steps", "planned_steps",
           "write_examples", "read_examples", "write_round_inputs", "EXAMPLES", "GROUPS", "PROMPT_IDS"]

Phase = Literal["sft", "gft_round", "grpo_round"]
EXAMPLES, GROUPS, PROMPT_IDS = "examples.parquet", "groups.parquet", "prompt_ids.json"  # inputs, in the job folder
Report = Callable[[dict[str, float], int], None]
"""Called with each reported step's row and the steps of the job done so far (a launched job's progress)."""

_CONFIGS = {"sft": SFTConfig, "gft_round": GFTConfig, "grpo_round": GRPOConfig}


class TrainJob(BaseModel):
    """What one training phase loads, runs and writes, by path: the launched job's `job.json`."""

    model_config = ConfigDict(extra="forbid")

    phase: Phase
    config: dict  # the phase's SFTConfig, GFTConfig or GRPOConfig, as JSON
    model: str  # the folder the weights start from (and the tokenizer; save_dtype "source" means its dtype)
    state: str | None = None  # a round's state/ to continue from (weights, optimizer, scheduler, step)
    reference: str | None = None  # a GRPO round's KL reference model folder (beta > 0)
    folder: str  # the job folder: the inputs; a launched job's result.json, steps.jsonl, error-<rank>.txt, job.log
    out: str  # model/ (and a round's state/) are written here
    work: str | None = None  # SFT's resumable work checkpoints
    round_idx: int = 0
    trust_remote_code: bool = False
    threads: int = 1  # torch's intra-op threads in each process (the stage's `threads`)
    launch_id: str = ""  # set by a launch, new for every launch: the rendezvous id's suffix on several nodes

    def settings(self) -> SFTConfig | GFTConfig | GRPOConfig:
        return _CONFIGS[self.phase].model_validate(self.config)


class JobResult(BaseModel):
    """What a job reports: this call's per-step history and the whole run's (SFT: the resumed steps first)."""

    history: list[dict[str, float]]
    full_history: list[dict[str, float]]
    behaviour: dict[str, float] = {}  # a GRPO round's behaviour-pass metrics (grpo.Trained.behaviour)


# ---------------------------------------------------------------------------------------------------------
# Steps, and the inputs in the job folder
# ---------------------------------------------------------------------------------------------------------


def round_steps(cfg: GFTConfig | GRPOConfig) -> int:
    """Optimizer steps of one round: minibatches_per_round (x num_iterations for GRPO)."""
    return cfg.minibatches_per_round * getattr(cfg, "num_iterations", 1)


def schedule_steps(cfg: SFTConfig | GFTConfig | GRPOConfig, n_examples: int = 0) -> int:
    """The length of the learning-rate schedule: SFT's steps over its examples, or every round's steps."""
    if isinstance(cfg, SFTConfig):
        return total_steps(cfg.train, n_examples)
    return cfg.rounds * round_steps(cfg)


def planned_steps(job: TrainJob) -> int:
    """The steps this job takes when it starts fresh (a progress bar's total)."""
    cfg = job.settings()
    if isinstance(cfg, SFTConfig):
        return schedule_steps(cfg, len(pd.read_parquet(Path(job.folder) / EXAMPLES, columns=["advantage"])))
    return round_steps(cfg)


def write_examples(folder: Path, examples: list[Example]) -> None:
    """Examples as a parquet file in the job folder (prompt ids, response ids, advantage)."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"prompt_ids": [list(e.prompt_ids) for e in examples],
                  "response_ids": [list(e.response_ids) for e in examples],
                  "advantage": [float(e.advantage) for e in examples]}).to_parquet(folder / EXAMPLES)


def read_examples(folder: Path) -> list[Example]:
    table = pd.read_parquet(folder / EXAMPLES)
    return [Example([int(t) for t in p], [int(t) for t in r], float(a))
            for p, r, a in zip(table["prompt_ids"], table["response_ids"], table["advantage"])]


def write_round_inputs(folder: Path, prompt_ids: list[list[int]], table: pd.DataFrame) -> None:
    """A round's rendered prompts and rewarded group table, in the job folder."""
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / GROUPS)
    write_text_atomic(folder / PROMPT_IDS, json.dumps(prompt_ids))


def _round_inputs(folder: Path) -> tuple[list[list[int]], pd.DataFrame]:
    return json.loads((folder / PROMPT_IDS).read_text()), pd.read_parquet(folder / GROUPS)


# ---------------------------------------------------------------------------------------------------------
# The one path: load -> train -> save
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    job: TrainJob
    cfg: SFTConfig | GFTConfig | GRPOConfig
    model: object  # the model, in cfg.train.master_dtype
    tok: object


def train(job: TrainJob, *, report: Report | None = None, progress: bool = False) -> JobResult:
    """Load `job.model` in the master dtype, run the phase, save model/ into `job.out` in the save dtype (a
    round also saves state/: float32 weights, optimizer, scheduler, step, for the next round). Every process of
    a launched job calls this; `report` gets each step's row (rank 0 reports), `progress` shows SFT's bar."""
    cfg = job.settings()
    remote = job.trust_remote_code
    loaded = _Loaded(job, cfg, load_model(job.model, trust_remote_code=remote, train=True,
                                          master_dtype=cfg.train.master_dtype),
                     chat.load_tokenizer(job.model, trust_remote_code=remote))
    dtype = save_dtype(cfg.train.save_dtype, job.model, trust_remote_code=remote)
    trainer, result = _PHASES[job.phase](loaded, report, progress)
    if job.phase != "sft":
        save_state(trainer, Path(job.out) / "state")
    save_model(trainer, Path(job.out) / "model", loaded.tok, dtype=dtype)
    return result


def _sft(loaded: _Loaded, report: Report | None, progress: bool) -> tuple[Trainer, JobResult]:
    cfg, job = loaded.cfg, loaded.job
    objective = sft_objective() if cfg.loss == "sft" else dft_objective()
    on_step = None if report is None else (lambda step, metrics: report(metrics, step))
    result = fit(loaded.model, read_examples(Path(job.folder)), objective, cfg.train,
                 pad_id=chat.pad_id(loaded.tok), checkpoint_dir=Path(job.work) if job.work else None,
                 progress_bar=progress, on_step=on_step)
    return result.trainer, JobResult(history=result.history, full_history=result.full_history)


def _round_trainer(loaded: _Loaded) -> Trainer:
    """A round's trainer over the whole schedule, continuing `job.state` when given, the RNGs seeded as the
    round seeds them (whatever ran before in the process)."""
    trainer = make_trainer(loaded.model, loaded.cfg.train, total_steps=schedule_steps(loaded.cfg))
    if loaded.job.state:
        load_state(trainer, Path(loaded.job.state))
    seed_round(loaded.cfg.train.seed, loaded.job.round_idx)
    return trainer


def _counted(report: Report | None) -> Callable[[dict[str, float]], None] | None:
    """A round's after-step hook: `report` with the round's steps so far."""
    if report is None:
        return None
    count = itertools.count(1)
    return lambda row: report(row, next(count))


def _gft_round(loaded: _Loaded, report: Report | None, progress: bool) -> tuple[Trainer, JobResult]:
    trainer = _round_trainer(loaded)
    prompts, groups = _round_inputs(Path(loaded.job.folder))
    history = gft.train_phase(trainer, prompts, groups, loaded.cfg, loaded.job.round_idx, chat.pad_id(loaded.tok),
                              after_step=_counted(report))
    return trainer, JobResult(history=history, full_history=history)


def _grpo_round(loaded: _Loaded, report: Report | None, progress: bool) -> tuple[Trainer, JobResult]:
    """The behaviour pass (the `prev` weights the job starts from: the old policy), the reference's log-probs
    (its whole model in every process, on the process's device) and the optimizer steps."""
    job = loaded.job
    trainer = _round_trainer(loaded)
    reference = None if job.reference is None else load_model(
        job.reference, trust_remote_code=job.trust_remote_code).to(trainer.accelerator.device)
    prompts, groups = _round_inputs(Path(job.folder))
    trained = grpo.train_phase(trainer, prompts, groups, loaded.cfg, job.round_idx, chat.pad_id(loaded.tok),
                               reference=reference, after_step=_counted(report))
    return trainer, JobResult(history=trained.history, full_history=trained.history, behaviour=trained.behaviour)


_PHASES = {"sft": _sft, "gft_round": _gft_round, "grpo_round": _grpo_round}
