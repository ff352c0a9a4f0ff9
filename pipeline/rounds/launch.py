"""Running a training job (`pipeline.rounds.job`): in this process, or as a torchrun job of several processes.

`run(job, launch)` is the one entry of the stages: with one process on one node it calls `job.train` here (the
one-process case); otherwise torchrun launches N copies of this module's `main`, each of which calls the same
`job.train`; accelerate joins them into one data-parallel group (DDP: gloo on CPU, NCCL on GPUs, or FSDP2), and
the trainer's split (every process takes its strided share of each step's global batch, the loss scaled so DDP's
mean is the one-process sum, `pipeline.model.trainer`) makes the result the one-process result up to float
rounding. `round_phase` is a round's train phase on top of `run`: it writes the round's inputs, then runs.

A launched job reads `job.json` and its inputs from the job folder, trains, writes the checkpoint (`model/`, and a
round's `state/`) into the stage's output folder, then `result.json` (the history; a GRPO round's behaviour
metrics too), before the stage publishes anything. Weights travel through folders, so several nodes need only a
shared file system for the run root. A failed process fails the stage with that process's error (each writes
`error-<rank>.txt`); the job runs in its own process group, stopped as a whole when the stage ends early or
passes `LaunchConfig.timeout_s`, and torchrun gets SIGTERM if the stage's process dies.

    python -m pipeline.rounds.launch JOB_JSON      (one process of a job: run by torchrun, never by hand)
    gft join JOB_JSON                              (another node's agent of one job of several nodes: `join`)
    gft follow RUN_ROOT                            (another node: join every such job of a run: `follow`)

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
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import LaunchConfig
from pipeline.memory.measure import Peak, measure, report_child, return_large_frees
from pipeline.progress import bar as progress_bar
from pipeline.rounds.job import JobResult, TrainJob, planned_steps, train, write_round_inputs
from pipeline.atomic import write_text_atomic

STEPS = "steps.jsonl"
JOIN_TIMEOUT_S = 600.0  # torchrun's default rendezvous join timeout: how long the stage's agent waits for the others
log = logging.getLogger(__name__)

__all__ = ["TrainJobError", "run", "round_phase", "run_job", "main", "join", "follow", "join_command"]


class TrainJobError(RuntimeError):
    """A training job failed: the message carries the first failing process's error and the job's log path."""


# ---------------------------------------------------------------------------------------------------------
# The stage's side: write the inputs, launch, wait, read the result
# ---------------------------------------------------------------------------------------------------------


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
    return f"gft join {spec}"


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


def run(job: TrainJob, launch: LaunchConfig, *, progress: bool = True,
        asleep: Callable[[], AbstractContextManager] = nullcontext) -> JobResult:
    """Run `job`: `job.train` in this process when `launch` is one process on one node, else a launched job of
    `launch.world_size` processes, each running `job.train`, while `asleep()` holds (the stage's engines sleep)."""
    if not launch.launched:
        return train(job, progress=progress)
    with asleep():
        return run_job(job, launch, steps=planned_steps(job), progress=progress)


def round_phase(job: TrainJob, launch: LaunchConfig, *, progress: bool = True,
                asleep: Callable[[], AbstractContextManager] = nullcontext,
                ) -> Callable[[list[list[int]], pd.DataFrame], JobResult]:
    """A round's train phase: (prompt ids, rewarded group table) -> the job's result, the inputs written into the
    job folder first."""
    def phase(prompt_ids: list[list[int]], table: pd.DataFrame) -> JobResult:
        write_round_inputs(Path(job.folder), prompt_ids, table)
        return run(job, launch, progress=progress, asleep=asleep)
    return phase


def run_job(job: TrainJob, launch: LaunchConfig, *, steps: int | None = None, progress: bool = True) -> JobResult:
    """Launch `job` on `launch.world_size` processes (nodes x processes) and wait, with a progress bar of its `steps` fed from the
    steps rank 0 reports (`steps.jsonl`); its result, or TrainJobError with the first failing process's error.
    The job's processes are all gone when this returns or raises."""
    if launch.cpu_offload and not torch.cuda.is_available():  # FSDP2's offload needs an accelerator to offload from
        raise ValueError(f"{job.phase}: train.launch.cpu_offload keeps FSDP2 shards in CPU memory between their uses "
                         "on a GPU, but this machine has no GPU (torch.cuda.is_available() is False): set it false")
    folder = Path(job.folder)
    for old in [folder / "result.json", folder / STEPS, *folder.glob("error-*.txt"), *folder.glob("peak-*.json")]:
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
            raise TrainJobError(f"{job.phase} training job passed timeout_s={launch.timeout_s:.0f}; "
                                f"stopped. Its log: {log_path}") from None
        except BaseException:
            _stop(proc)
            raise
    _report_peaks(folder)
    if code != 0 or not (folder / "result.json").is_file():
        raise TrainJobError(_failure(job, launch, code, log_path))
    return JobResult.model_validate_json((folder / "result.json").read_text())


def _report_peaks(folder: Path) -> None:
    """Hand the peaks the job's processes wrote (`peak-<rank>.json`) to the stage's open measurement
    (`pipeline.memory.measure.report_child`): the stage's manifest then carries perf/peak_child_rss_gb. Only this
    node's processes: another node's ranks write theirs to the shared folder too, so ranks of other hosts are
    left out by their host name."""
    host = socket.gethostname()
    for path in sorted(folder.glob("peak-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a process killed while writing: its peak is lost, the job's failure says why
        if data.pop("host", host) == host:
            report_child(Peak(rss=data["rss"], cuda_allocated={int(k): v for k, v in data["cuda_allocated"].items()},
                              cuda_reserved={int(k): v for k, v in data["cuda_reserved"].items()}))


def _write_peak(job: TrainJob, rank: int, peak: Peak) -> None:
    """This process's peak, for the stage's side (`_report_peaks`)."""
    data = {"host": socket.gethostname(), "rss": peak.rss, "cuda_allocated": peak.cuda_allocated,
            "cuda_reserved": peak.cuda_reserved}
    write_text_atomic(Path(job.folder) / f"peak-{rank}.json", json.dumps(data))


def _announce(job: TrainJob, launch: LaunchConfig, spec: Path) -> None:
    """Log what the other nodes of a job of several nodes must run, and that they must share the job folder."""
    if launch.nodes > 1:
        log.info("%s training job on %d nodes: waiting at %s for %d more node(s); the job folder %s must be on a "
                 "file system they share. On each: %s  (or, for every job of the run: gft follow RUN_ROOT)", job.phase, launch.nodes, launch.rdzv_endpoint,
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
        return (f"{job.phase} training job ({_size(launch)}) failed in process "
                f"{errors[0].stem.removeprefix('error-')}:"
                f" {last}\n(full traceback: {errors[0]}; job log: {log_path})")
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    return (f"{job.phase} training job ({_size(launch)}) exited with {code}; log {log_path}:\n{tail}"
            + _nodes_hint(job, launch))


def _size(launch: LaunchConfig) -> str:
    return f"{launch.processes} processes" + (f" x {launch.nodes} nodes" if launch.nodes > 1 else "")


def _nodes_hint(job: TrainJob, launch: LaunchConfig) -> str:
    """What a job of several nodes needs, for its failure message."""
    if launch.nodes == 1:
        return ""
    return (f"\nA job of {launch.nodes} nodes needs the other nodes to join at {launch.rdzv_endpoint} "
            f"(`{join_command(Path(job.folder) / 'job.json')}`, or `gft follow RUN_ROOT` for every job "
            f"of a run), and its folder {job.folder} on a file system all nodes share.")


# ---------------------------------------------------------------------------------------------------------
# The job's side: one process of N
# ---------------------------------------------------------------------------------------------------------


def _reporter(job: TrainJob):
    """Appends a reported step's row to `steps.jsonl` with `done`, the job's steps done so far (SFT: the step
    number, so a resumed job starts where it left). Rank 0 only."""
    path = Path(job.folder) / STEPS

    def report(row: dict[str, float], done: int) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            with open(path, "a") as fh:
                fh.write(json.dumps({**row, "done": done}) + "\n")
    return report


def main(spec_path: str) -> None:
    """One process of the job: `job.train` per `job.json`; rank 0 writes `result.json` last."""
    job = TrainJob.model_validate_json(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    return_large_frees()  # as in the run's own process (pipeline.runtime.Resources)
    try:
        torch.set_num_threads(job.threads)
        with measure() as peak:
            result = train(job, report=_reporter(job))
    except BaseException:
        write_text_atomic(Path(job.folder) / f"error-{rank}.txt", traceback.format_exc())
        raise
    _write_peak(job, rank, peak)
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


def _waiting_jobs(candidates: Iterable[Path]) -> dict[str, Path]:
    """The launch ids of the jobs of several nodes among `candidates` (job.json files) that may still wait for this
    node (no result yet, job.json written within the rendezvous join timeout), and their job.json."""
    found = {}
    for spec in candidates:
        try:
            fresh = spec.stat().st_mtime > time.time() - JOIN_TIMEOUT_S
            job = TrainJob.model_validate_json(spec.read_text()) if fresh else None
        except (OSError, ValueError):
            continue  # gone, or being replaced: the next look sees it
        if job and job.launch_id and _job_launch(job).nodes > 1 and not (spec.parent / "result.json").exists():
            found[job.launch_id] = spec
    return found


def follow(candidates: Callable[[], Iterable[Path]], *, poll_s: float = 1.0, jobs: int | None = None) -> None:
    """Join every job of several nodes among the job.json files `candidates()` lists (for a run root:
    `pipeline.store.jobs.job_files(root)`), one at a time, until killed (or after `jobs` jobs): the other nodes'
    side of a run with `launch.nodes > 1`. A job is joined once, if it has no result yet and was launched within
    the join timeout (an older one cannot be waiting for us)."""
    joined, done = set(), 0
    print("following: joining the jobs of several nodes as they are launched", flush=True)
    while jobs is None or done < jobs:
        for launch_id, spec in _waiting_jobs(candidates()).items():
            if launch_id not in joined:
                joined.add(launch_id)
                print(f"joining {spec}", flush=True)
                print(f"{spec}: exit code {join(spec)}", flush=True)
                done += 1
        time.sleep(poll_s)


if __name__ == "__main__":  # torchrun's entry: one process of a job
    main(sys.argv[1])
