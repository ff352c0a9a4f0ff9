"""Retention and resume bookkeeping of a chain of rounds: what a finished round keeps once its successor is
published, and whether a round can still be continued from.

`retain` prunes through `StageStore.prune` (which records what went in the output's `pruned.json`); `resumable`
reads that record. The run (`pipeline.run`) calls both between rounds.
"""

from __future__ import annotations

import logging

from pipeline.config import RetentionConfig
from pipeline.store.artifacts import ArtifactRef, StageStore

__all__ = ["retain", "resumable"]

log = logging.getLogger(__name__)


def retain(store: StageStore, ref: ArtifactRef, round_idx: int, cfg: RetentionConfig) -> int:
    """Prune a finished round whose successor is published: its `state/` unless every round keeps it, its `model/`
    unless it is an every-Nth round. Returns the bytes freed (the round's history and groups always stay)."""
    prefixes = ["state/"] if cfg.state == "last" else []
    if not (cfg.model_every and (round_idx + 1) % cfg.model_every == 0):
        prefixes.append("model/")
    freed = store.prune(ref, prefixes) if prefixes else 0
    if freed:
        log.info("round %d (%s): pruned %s, %.0f MiB freed", round_idx, ref.path.name[:12], prefixes, freed / 2**20)
    return freed


def resumable(store: StageStore, ref: ArtifactRef) -> bool:
    """Whether a round can be continued from `ref`: nothing of it pruned (any other reference: always)."""
    return not store.pruned(ref)
