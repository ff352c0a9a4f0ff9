"""Where a run root keeps the job folders of launched training: the listing another node's `gft follow` polls.

A stage's training job lives in its key's work folder (`<root>/<stage>/.ckpt-<key>/job/`, `StageStore.work_dir`),
so the store, which owns that layout, is the one to list them; `pipeline.rounds.launch.follow` reads what is
listed and decides which jobs are still waiting for another node.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["JOB_FOLDER", "job_files"]

JOB_FOLDER = "job"  # inside a stage key's work folder


def job_files(root: str | Path) -> list[Path]:
    """Every job.json under the run root `root` (candidates: finished, stale and foreign ones included)."""
    return sorted(Path(root).glob(f"*/.ckpt-*/{JOB_FOLDER}/job.json"))
