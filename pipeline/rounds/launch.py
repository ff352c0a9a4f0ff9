"""The training phase of a stage as a job of several processes: torchrun launches N copies of this module's
`main`, accelerate joins them into one data-parallel group (DDP: gloo on CPU, NCCL on GPUs), and the trainer's
existing split (every process takes its strided share of each step's global batch, the loss scaled so DDP's mean
is the one-process sum, `pipeline.model.trainer`) makes the result the one-process result up to float rounding.

The stage writes what training needs into a job folder (`job.json`: the settings and paths; `examples.parquet`, or
a round's `groups.parquet` and `prompt_ids.json`), launches the job and waits; the job reads its inputs by path, trains, and writes the checkpoint (`model/`, and a
round's `state/`) into the stage's output folder, then `result.json` (the history; a GRPO round's behaviour
metrics too), before the stage publishes anything. A GRPO round's job scores its old-policy log-probs with the
`prev` checkpoint it continues from and its reference log-probs with the reference checkpoint, as in process. Weights travel through folders, so several nodes need only a shared file system for the run root.

A failed process fails the stage with that process's error (each writes `error-<rank>.txt`); the job runs in its
own process group, stopped as a whole when the stage ends early or passes `LaunchConfig.timeout_s`, and torchrun
gets SIGTERM if the stage's process dies. SFT resumes from its work checkpoints as in process.

    python -m pipeline.rounds.launch JOB_JSON              (run by torchrun, never by hand)
    python -m pipeline.rounds.launch --join JOB_JSON       (another node's agent of one job of several nodes)
    python -m pipeline.rounds.launch --follow RUN_ROOT     (another node: join every such job of a run)

With `LaunchConfig.nodes > 1` the stage's torchrun agent hosts a c10d rendezvous at `rdzv_endpoint` and waits for
the other nodes' agents; ranks may land on any node, so the job folder and the stage's output folder (the run root)
must be on a file system every node shares.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from accelerate.utils import set_seed
from pydantic import BaseModel, ConfigDict

from pipeline.config import GFTConfig, GRPOConfig, LaunchConfig, SFTConfig
from pipeline.data import chat
from pipeline.model.batches import Example
from pipeline.model.checkpoint import load_state, save_state
from pipeline.model.loading import load_model
from pipeline.model.loop import fit
from pipeline.model.scoring import dft_objective, sft_objective
from pipeline.model.trainer import make_trainer, save_model
from pipeline.rounds import gft, grpo
from pipeline.rounds.groups import derive_seed
from pipeline.progress import bar as progress_bar
from pipeline.atomic import write_text_atomic

STEPS = "steps.jsonl"
log = logging.getLogger(__name__)

__all__ = ["TrainJob", "TrainJobError", "JobResult", "run_job", "write_examples", "main", "join", "follow",
           "join_command"]


class TrainJobError(RuntimeError):
    """A training job failed: the message carries the first failing process's error and the job's log path."""


class TrainJob(BaseModel):
    """Everything a job process needs, by path: written by the stage as `job.json`."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["sft", "gft_round", "grpo_round"]
    config: dict  # SFTConfig, GFTConfig or GRPOConfig, as JSON
    model: str  # the folder the weights start from (and the tokenizer)
    state: str | None = None  # a round's state/ to continue from
    reference: str | None = None  # a GRPO round's KL reference model folder (beta > 0)
    folder: str  # the job folder: examples.parquet, result.json, error-<rank>.txt, job.log
    out: str  # the stage's output folder: model/ (and state/) are written here
    save_dtype: str
    checkpoint_dir: str | None = None  # SFT's resumable work checkpoints
    round_idx: int = 0
    trust_remote_code: bool = False
    launch_id: str = ""  # set by run_job, new for every launch: the rendezvous id's suffix on several nodes


class JobResult(BaseModel):
    """What the job reports: this call's per-step history and the whole run's (SFT: the resumed steps first)."""

    history: list[dict[str, float]]
    full_history: list[dict[str, float]]
    behaviour: dict[str, float] = {}  # a GRPO round's behaviour-pass metrics (grpo.Trained.behaviour)


# ---------------------------------------------------------------------------------------------------------
# The stage's side: write the inputs, launch, wait, read the result
# ---------------------------------------------------------------------------------------------------------


def write_examples(examples: list[Example], path: Path) -> Path:
    """Examples as a parquet file (prompt ids, response ids, advantage: the fields SFT and GFT train on)."""
    pd.DataFrame({"prompt_ids": [list(e.prompt_ids) for e in examples],
                  "response_ids": [list(e.response_ids) for e in examples],
                  "advantage": [float(e.advantage) for e in examples]}).to_parquet(path)
    return path


def _read_examples(path: Path) -> list[Example]:
    table = pd.read_parquet(path)
    return [Example([int(t) for t in p], [int(t) for t in r], float(a))
            for p, r, a in zip(table["prompt_ids"], table["response_ids"], table["advantage"])]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the stage's process dies (Linux), so no job outlives a kill -9."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _command(launch: LaunchConfig, spec: Path, launch_id: str, *, host: bool = True) -> list[str]:
    """torchrun for this node: standalone on one node; with several, a c10d rendezvous at `launch.rdzv_endpoint`
    whose store the stage's node hosts (`host`) and the others join, under an id of this launch only."""
    if launch.nodes == 1:
        where = ["--standalone", "--nnodes", "1"]
    else:
        where = ["--nnodes", str(launch.nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(launch.rdzv_endpoint),
                 "--rdzv-id", f"{launch.rdzv_id}-{launch_id}", "--rdzv-conf", f"is_host={int(host)}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(launch.processes),
            "-m", "pipeline.rounds.launch", str(spec)]


def join_command(spec: Path | str) -> str:
    """What another node runs to join the job of `spec` (a job.json on the shared file system)."""
    return f"{Path(sys.executable).name} -m pipeline.rounds.launch --join {spec}"


def _start(cmd: list[str], log_file) -> subprocess.Popen:
    """The torchrun agent in a process group of its own, SIGTERM'd if this process dies."""
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_die_with_parent)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group, SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(job: TrainJob, launch: LaunchConfig, *, steps: int | None = None, progress: bool = True) -> JobResult:
    """Launch `job` on `launch.world_size` processes (nodes x processes) and wait, with a progress bar of its `steps` fed from the
    steps rank 0 reports (`steps.jsonl`); its result, or TrainJobError with the first failing process's error.
    The job's processes are all gone when this returns or raises."""
    if launch.cpu_offload and not torch.cuda.is_available():  # FSDP2's offload needs an accelerator to offload from
        raise ValueError(f"{job.stage}: train.launch.cpu_offload keeps FSDP2 shards in CPU memory between their uses "
                         "on a GPU, but this machine has no GPU (torch.cuda.is_available() is False): set it false")
    folder = Path(job.folder)
    for old in [folder / "result.json", folder / STEPS, *folder.glob("error-*.txt")]:
        old.unlink(missing_ok=True)
    job = job.model_copy(update={"launch_id": uuid.uuid4().hex[:12]})
    spec = write_text_atomic(folder / "job.json", job.model_dump_json(indent=1))
    _announce(job, launch, spec)
    log_path = folder / "job.log"
    with open(log_path, "w") as log_file:
        proc = _start(_command(launch, spec, job.launch_id), log_file)
        try:
            code = _follow(proc, folder / STEPS, launch, steps, progress)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise TrainJobError(f"{job.stage} training job passed timeout_s={launch.timeout_s:.0f}; "
                                f"stopped. Its log: {log_path}") from None
        except BaseException:
            _stop(proc)
            raise
    if code != 0 or not (folder / "result.json").is_file():
        raise TrainJobError(_failure(job, launch, code, log_path))
    return JobResult.model_validate_json((folder / "result.json").read_text())


def _announce(job: TrainJob, launch: LaunchConfig, spec: Path) -> None:
    """Log what the other nodes of a job of several nodes must run, and that they must share the job folder."""
    if launch.nodes > 1:
        log.info("%s training job on %d nodes: waiting at %s for %d more node(s); the job folder %s must be on a "
                 "file system they share. On each: %s  (or, for every job of the run: python -m "
                 "pipeline.rounds.launch --follow RUN_ROOT)", job.stage, launch.nodes, launch.rdzv_endpoint,
                 launch.nodes - 1, spec.parent, join_command(spec))


def _follow(proc: subprocess.Popen, steps_file: Path, launch: LaunchConfig, steps: int | None,
            progress: bool) -> int:
    """Wait for the job, advancing one bar per step line rank 0 appends; its exit code."""
    deadline = time.monotonic() + launch.timeout_s
    offset = 0
    with progress_bar(total=steps, desc=f"train x{launch.world_size}", disable=not progress) as bar:
        while (code := proc.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, launch.timeout_s)
            rows, offset = _new_rows(steps_file, offset)
            if rows:
                bar.update(int(rows[-1]["done"]) - bar.n)
                bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", gnorm=f"{rows[-1]['grad_norm']:.3f}")
            time.sleep(0.5)
    return code


def _new_rows(path: Path, offset: int) -> tuple[list[dict[str, float]], int]:
    """The complete lines of the job's step file after byte `offset`, and the offset after them (a line still
    being written is left for the next look)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], offset
    complete = chunk[:chunk.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines()], offset + len(complete)


def _failure(job: TrainJob, launch: LaunchConfig, code: int, log_path: Path) -> str:
    """The first process error (its last traceback line and the file), else the log's tail."""
    errors = sorted(Path(job.folder).glob("error-*.txt"))
    if errors:
        last = errors[0].read_text().strip().splitlines()[-1]
        return (f"{job.stage} training job ({_size(launch)}) failed in process "
                f"{errors[0].stem.removeprefix('error-')}:"
                f" {last}\n(full traceback: {errors[0]}; job log: {log_path})")
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    return (f"{job.stage} training job ({_size(launch)}) exited with {code}; log {log_path}:\n{tail}"
            + _nodes_hint(job, launch))


def _size(launch: LaunchConfig) -> str:
    return f"{launch.processes} processes" + (f" x {launch.nodes} nodes" if launch.nodes > 1 else "")


def _nodes_hint(job: TrainJob, launch: LaunchConfig) -> str:
    """What a job of several nodes needs, for its failure message."""
    if launch.nodes == 1:
        return ""
    return (f"\nA job of {launch.nodes} nodes needs the other nodes to join at {launch.rdzv_endpoint} "
            f"(`{join_command(Path(job.folder) / 'job.json')}`, or `python -m pipeline.rounds.launch --follow "
            f"RUN_ROOT` for every job of a run), and its folder {job.folder} on a file system all nodes share.")


# ---------------------------------------------------------------------------------------------------------
# The job's side: one process of N
# ---------------------------------------------------------------------------------------------------------


def _reporter(job: TrainJob):
    """Appends a finished step's row to `steps.jsonl` with `done`, the steps of the job's bar done so far (SFT:
    the step number, so a resumed job starts where it left; a round: its rows so far). Rank 0 only."""
    path, count = Path(job.folder) / STEPS, iter(range(1, 1 << 62))

    def report(row: dict[str, float], done: int | None = None) -> None:
        n = next(count)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(path, "a") as fh:
                fh.write(json.dumps({**row, "done": done or n}) + "\n")
    return report


def _sft(job: TrainJob, cfg: SFTConfig, model, tok) -> JobResult:
    objective = sft_objective() if cfg.loss == "sft" else dft_objective()
    examples = _read_examples(Path(job.folder) / "examples.parquet")
    report = _reporter(job)
    result = fit(model, examples, objective, cfg.train, pad_id=chat.pad_id(tok),
                 checkpoint_dir=Path(job.checkpoint_dir) if job.checkpoint_dir else None, progress_bar=False,
                 on_step=lambda step, metrics: report(metrics, step))
    save_model(result.trainer, Path(job.out) / "model", tok, dtype=getattr(torch, job.save_dtype))
    return JobResult(history=result.history, full_history=result.full_history)


def _round_trainer(job: TrainJob, cfg: GFTConfig | GRPOConfig, model, steps: int):
    """A round's trainer, continuing `job.state` when given, and the RNGs seeded as the round seeds them."""
    trainer = make_trainer(model, cfg.train, total_steps=steps)
    if job.state:
        load_state(trainer, Path(job.state))
    set_seed(derive_seed(cfg.train.seed, "round", job.round_idx))
    return trainer


def _round_inputs(job: TrainJob) -> tuple[list[list[int]], pd.DataFrame]:
    """The round's prompt ids and rewarded group table, as the stage wrote them."""
    prompts = json.loads((Path(job.folder) / "prompt_ids.json").read_text())
    return prompts, pd.read_parquet(Path(job.folder) / "groups.parquet")


def _save_round(job: TrainJob, trainer, tok) -> None:
    save_state(trainer, Path(job.out) / "state")
    save_model(trainer, Path(job.out) / "model", tok, dtype=getattr(torch, job.save_dtype))


def _gft_round(job: TrainJob, cfg: GFTConfig, model, tok) -> JobResult:
    trainer = _round_trainer(job, cfg, model, cfg.rounds * cfg.minibatches_per_round)
    prompts, groups = _round_inputs(job)
    history = gft.train_phase(trainer, prompts, groups, cfg, job.round_idx, chat.pad_id(tok),
                              after_step=_reporter(job))
    _save_round(job, trainer, tok)
    return JobResult(history=history, full_history=history)


def _grpo_round(job: TrainJob, cfg: GRPOConfig, model, tok) -> JobResult:
    """The round's behaviour pass (the `prev` weights this job starts from: the old policy), the reference's
    log-probs (its whole model in every process, on the process's device) and the optimizer steps."""
    trainer = _round_trainer(job, cfg, model, cfg.rounds * cfg.minibatches_per_round * cfg.num_iterations)
    reference = None if job.reference is None else load_model(
        job.reference, trust_remote_code=job.trust_remote_code).to(trainer.accelerator.device)
    prompts, groups = _round_inputs(job)
    trained = grpo.train_phase(trainer, prompts, groups, cfg, job.round_idx, chat.pad_id(tok), reference=reference,
                               after_step=_reporter(job))
    _save_round(job, trainer, tok)
    return JobResult(history=trained.history, full_history=trained.history, behaviour=trained.behaviour)


_CONFIGS = {"sft": SFTConfig, "gft_round": GFTConfig, "grpo_round": GRPOConfig}
_TRAIN = {"sft": _sft, "gft_round": _gft_round, "grpo_round": _grpo_round}


def main(spec_path: str) -> None:
    """One process of the job: train per `job.json`; rank 0 writes `result.json` last."""
    job = TrainJob.model_validate_json(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        cfg = _CONFIGS[job.stage].model_validate(job.config)
        tok = chat.load_tokenizer(job.model, trust_remote_code=job.trust_remote_code)
        model = load_model(job.model, trust_remote_code=job.trust_remote_code, train=True,
                           master_dtype=cfg.train.master_dtype)
        result = _TRAIN[job.stage](job, cfg, model, tok)
    except BaseException:
        write_text_atomic(Path(job.folder) / f"error-{rank}.txt", traceback.format_exc())
        raise
    if rank == 0:
        write_text_atomic(Path(job.folder) / "result.json", result.model_dump_json())
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 may be on another node: the stage's agent ends after result.json
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# The other nodes' side: join a job of several nodes, or every such job of a run
# ---------------------------------------------------------------------------------------------------------


def _job_launch(job: TrainJob) -> LaunchConfig:
    return LaunchConfig.model_validate(job.config["train"]["launch"])


def join(spec_path: str | Path) -> int:
    """Run this node's torchrun agent for the job of `spec_path` (a job.json the stage wrote on the shared file
    system) until the job ends; its exit code. Every node but the stage's runs this once per job."""
    spec = Path(spec_path)
    job = TrainJob.model_validate_json(spec.read_text())
    launch = _job_launch(job)
    if launch.nodes == 1:
        raise ValueError(f"{spec}: a job of one node, nothing to join")
    joiner = f"join-{socket.gethostname()}-{os.getpid()}.log"
    with open(Path(job.folder) / joiner, "w") as log_file:
        proc = _start(_command(launch, spec, job.launch_id, host=False), log_file)
        try:
            return proc.wait()
        except BaseException:
            _stop(proc)
            raise


JOIN_TIMEOUT_S = 600.0  # torchrun's default rendezvous join timeout: how long the stage's agent waits for the others


def _job_files(root: Path) -> dict[str, Path]:
    """The launch ids of the multi-node jobs under a run root that may still wait for this node (no result yet,
    job.json written within the rendezvous join timeout), and their job.json."""
    found = {}
    for spec in sorted(root.glob("*/.ckpt-*/job/job.json")):
        try:
            fresh = spec.stat().st_mtime > time.time() - JOIN_TIMEOUT_S
            job = TrainJob.model_validate_json(spec.read_text()) if fresh else None
        except (OSError, ValueError):
            continue  # gone, or being replaced: the next look sees it
        if job and job.launch_id and _job_launch(job).nodes > 1 and not (spec.parent / "result.json").exists():
            found[job.launch_id] = spec
    return found


def follow(root: str | Path, *, poll_s: float = 1.0, jobs: int | None = None) -> None:
    """Join every job of several nodes that a stage launches under the run root `root`, one at a time, until
    killed (or after `jobs` jobs): the other nodes' side of a run with `launch.nodes > 1`. A job is joined once,
    if it has no result yet and was launched within the join timeout (an older one cannot be waiting for us)."""
    root, joined, done = Path(root), set(), 0
    print(f"following {root}: joining its jobs of several nodes", flush=True)
    while jobs is None or done < jobs:
        for launch_id, spec in _job_files(root).items():
            if launch_id not in joined:
                joined.add(launch_id)
                print(f"joining {spec}", flush=True)
                print(f"{spec}: exit code {join(spec)}", flush=True)
                done += 1
        time.sleep(poll_s)


def _cli(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.rounds.launch", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("spec", nargs="?", help="job.json: one process of the job (run by torchrun, never by hand)")
    what.add_argument("--join", metavar="JOB_JSON", help="run this node's agent of one job of several nodes")
    what.add_argument("--follow", metavar="RUN_ROOT", help="join every job of several nodes launched under RUN_ROOT")
    args = parser.parse_args(argv)
    if args.join:
        sys.exit(join(args.join))
    elif args.follow:
        follow(args.follow)
    else:
        main(args.spec)


if __name__ == "__main__":
    _cli(sys.argv[1:])
