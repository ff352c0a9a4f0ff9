"""How a stage call is cached, and what a process keeps between stages.

A `StageSpec` names one stage call before it runs (stage, settings, input references); its key is
`stage_key(stage, VERSIONS[stage], config digest, input digests)`, the store's folder name and Prefect's cache
key. `cached` serves the verified output under that key or builds it into a fresh folder and publishes it
atomically, as one child run of the tracker. `Resources` holds the store, the engines by role, the reward
workers and the tracker, built once per process and shared by the stages in `pipeline.stages`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.store.artifacts import ArtifactRef, StageStore, stage_key, tree_sha256
from pipeline.config import EngineConfig, Settings
from pipeline.rollout.engines import Engine, build_engine
from pipeline.rollout.verifiers import Scorer
from pipeline.tracking import NullTracker, Tracker

__all__ = ["VERSIONS", "Resources", "StageSpec", "cached", "model_dir", "external_model"]

log = logging.getLogger(__name__)

# Bump a stage's version when its code changes what it writes: the key covers configs and inputs, not code.
VERSIONS = {"prepare_data": 2, "bootstrap_models": 1, "teacher_sample": 1, "sft": 1, "gft_round": 1, "grpo_round": 1,
            "evaluate": 1}


@dataclass
class Resources:
    """What a process keeps between stages: the artifact store, engines by role, reward workers, counters."""

    store: StageStore
    engine_cfg: EngineConfig = EngineConfig()
    progress: bool = True
    engines: dict[str, tuple[Engine, str]] = field(default_factory=dict)
    scorers: dict[str, Scorer] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # work actually done, for tests and the summary
    tracker: Tracker = field(default_factory=NullTracker)
    force: bool = False  # recompute even valid outputs (`gft run --refresh STAGE` sets it from STAGE on)

    def engine(self, role: str, model_dir: str) -> Engine:
        """The engine of a role (policy, teacher, base), built once and refreshed in place to model_dir."""
        if role not in self.engines:
            self.engines[role] = (build_engine(model_dir, self.engine_cfg), model_dir)
        engine, loaded = self.engines[role]
        if loaded != model_dir:
            engine.load_weights(model_dir)
            self.engines[role] = (engine, model_dir)
        return engine

    def scorer(self, reward: str) -> Scorer:
        if reward not in self.scorers:
            self.scorers[reward] = Scorer(reward)
        return self.scorers[reward]

    def count(self, what: str, n: int = 1) -> None:
        self.calls[what] = self.calls.get(what, 0) + n

    def close(self) -> None:
        for engine, _ in self.engines.values():
            engine.close()
        for scorer in self.scorers.values():
            scorer.close()
        self.engines.clear()
        self.scorers.clear()


def _digest(configs: Sequence[Settings]) -> str:
    return hashlib.sha256("|".join(c.digest() for c in configs).encode()).hexdigest()


@dataclass(frozen=True)
class StageSpec:
    """What identifies one stage call before it runs: the stage, its settings, its inputs and any extra key."""

    stage: str
    configs: tuple[Settings, ...]
    inputs: tuple[ArtifactRef, ...]
    kind: str
    extra_key: str = ""

    @property
    def key(self) -> str:
        """`stage_key(stage, VERSIONS[stage], config digest + extra key, input digests)`: the store's folder name
        and Prefect's cache key."""
        return stage_key(self.stage, VERSIONS[self.stage], _digest(self.configs) + self.extra_key,
                         [r.sha256 for r in self.inputs])


def cached(res: Resources, spec: StageSpec, build: Callable[[Path, str], dict[str, float]]) -> ArtifactRef:
    """Serve the stage's verified output, or run `build(folder, key)` into a fresh folder and publish it; `res.force`
    recomputes even a valid output. The computation is one child run of the tracker."""
    key = spec.key
    ref = None if res.force else res.store.lookup(spec.stage, key)
    if ref is not None:
        log.info("%s %s: served from cache", spec.stage, key[:12])
        return ref
    config = {type(c).__name__: c.model_dump(mode="json") for c in spec.configs}
    log.info("%s %s: running", spec.stage, key[:12])
    start = time.perf_counter()
    with res.tracker.stage_run(spec.stage, key, config, spec.inputs) as run:
        with res.store.write(spec.stage, key, kind=spec.kind, version=VERSIONS[spec.stage], config=config,
                             inputs=list(spec.inputs)) as out:
            out.metrics.update(build(Path(out.path), key))
            out.metrics["wall_time_s"] = time.perf_counter() - start
        run.finish(out.ref, res.store.manifest(out.ref))
    res.count(spec.stage)
    return out.ref


def model_dir(ref: ArtifactRef) -> str:
    """The Hugging Face folder (or hub id) a model reference stands for."""
    return ref.uri if ref.kind == "external_model" else str(Path(ref.uri) / "model")


def external_model(spec: str) -> ArtifactRef:
    """A model the pipeline did not build (hub id or local folder), identified by its spec (and content when local)."""
    path = Path(spec)
    sha = tree_sha256(path) if path.is_dir() else stage_key("external", 0, spec, [])
    return ArtifactRef(kind="external_model", uri=str(path.resolve()) if path.is_dir() else spec, sha256=sha,
                       schema_version=1)
