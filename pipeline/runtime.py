"""What a process keeps between stages (`Resources`), the stage table, and how one stage call runs under the
cache (`cached`).

`Resources` holds the store, the engines by role, the verifier processes and the tracker, built once per process
and shared by the stages in `pipeline.stages`. The stage table: `@stage` registers a stage function, `bind` binds a
call's arguments and derives its key from them (`pipeline.store.cache.derive_spec`), `execute` runs a bound call
under the cache. `cached` serves the verified output of a `StageSpec`'s key, or builds it into a fresh folder and
publishes it atomically, as one child run of the tracker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import EngineConfig
from pipeline.memory.measure import measure, return_large_frees
from pipeline.rollout.engines import Engine, build_engine
from pipeline.rollout.verifiers import Verifier
from pipeline.store.artifacts import ArtifactRef, StageStore, stage_key, tree_sha256
from pipeline.store.cache import VERSIONS, StageSpec, derive_spec
from pipeline.tracking import NullTracker, Tracker

__all__ = ["Resources", "STAGE_ROLES", "roles_of", "return_memory", "Job", "StageCall", "STAGES", "stage", "bind",
           "execute", "cached", "model_dir", "external_model"]

log = logging.getLogger(__name__)


STAGE_ROLES: dict[str, tuple[str, ...]] = {"teacher_sample": ("teacher",), "evaluate": ("eval", "base"),
                                           "gft_round": ("policy",), "grpo_round": ("policy",)}
"""The engine roles each stage uses (`Resources.engine`); a stage not named uses none."""


def roles_of(stages: Iterable[str]) -> set[str]:
    """The engine roles the stages use, together."""
    return {role for name in stages for role in STAGE_ROLES.get(name, ())}


@dataclass
class _Loaded:
    engine: Engine
    cfg: EngineConfig


@dataclass
class Resources:
    """What a process keeps between stages: the artifact store, engines by role, verifiers, counters."""

    store: StageStore
    progress: bool = True
    engines: dict[str, _Loaded] = field(default_factory=dict)
    verifiers: dict[str, Verifier] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # work actually done, for tests and the summary
    tracker: Tracker = field(default_factory=NullTracker)
    force: bool = False  # recompute even valid outputs (`gft run --refresh STAGE` sets it from STAGE on)
    weights: dict[int, str] = field(default_factory=dict)  # id(engine) -> the checkpoint its weights are now
    keep_engines: bool = False  # the old lifetime: every engine lives until close() (bench/memory.py's baseline)
    returned_after: int = -1  # computed stages (sum of `calls`) when memory was last returned

    def __post_init__(self) -> None:
        if not self.keep_engines:  # the old lifetime keeps glibc's default too (bench/memory.py's baseline)
            return_large_frees()

    def engine(self, role: str, model_dir: str, cfg: EngineConfig) -> Engine:
        """The engine of a role (policy, teacher, base, eval) with settings `cfg`, holding model_dir's weights.
        Built once per role and refreshed in place; roles may share one engine object (vLLM keeps one engine per
        model folder), so the weights are checked against what the engine holds now, not what the role loaded
        last: every role samples the checkpoint it names."""
        loaded = self.engines.get(role)
        if loaded is not None and loaded.cfg != cfg:
            self._release(role)
            loaded = None
        if loaded is None:
            loaded = self.engines[role] = _Loaded(build_engine(model_dir, cfg, progress=self.progress), cfg)
            self.weights[id(loaded.engine)] = model_dir  # a fresh (or shared, reset) engine holds its folder's
        if self.weights.get(id(loaded.engine)) != model_dir:
            loaded.engine.load_weights(model_dir)
            self.weights[id(loaded.engine)] = model_dir
        return loaded.engine

    @contextmanager
    def engines_asleep(self) -> Iterator[list[Engine]]:
        """Around a launched training job on the engines' GPUs: every engine that can sleep (vLLM with
        `enable_sleep_mode`) gives its GPU memory back for the block and takes it again after, even if the block
        fails, holding the weights it held; the next `engine()` call then loads the new checkpoint from its folder.
        Other engines keep their memory through the block (docs/scale.md). Yields the engines put to sleep."""
        sleepers = {id(e.engine): e.engine for e in self.engines.values()
                    if e.cfg.backend == "vllm" and e.cfg.enable_sleep_mode}
        with ExitStack() as stack:
            for engine in sleepers.values():
                engine.sleep()
                stack.callback(engine.wake_up)
            if sleepers:
                log.info("%d engine(s) asleep while the training job runs", len(sleepers))
            yield list(sleepers.values())

    def hold(self, roles: Iterable[str], *, later: Iterable[str] = ()) -> list[str]:
        """Before a stage: keep the engines of `roles` (the roles the stage uses) and release the others, memory
        returned. An engine whose role a later stage of this process uses (`later`) is kept only when it is costly
        to rebuild (vLLM); an HF engine is rebuilt from its folder when its role comes back, which reads the same
        files `load_weights` reads anyway. Memory the last stage freed is returned either way. With `keep_engines`
        nothing is released or returned (the old lifetime). The roles released."""
        if self.keep_engines:
            return []
        roles, later = set(roles), set(later)
        gone = [role for role, loaded in self.engines.items()
                if role not in roles and (role not in later or loaded.cfg.backend == "hf")]
        self.release(*gone)
        if not gone and sum(self.calls.values()) != self.returned_after:
            self.return_memory()  # what the last stage freed (a trainer, scoring models) goes back before this one
        return gone

    def return_memory(self) -> None:
        """`return_memory`, noting the work done so far: a cached stage frees nothing, so the next `hold` skips
        the collection (0.4 s of gc per served stage made a cached rerun of the default 4x slower)."""
        return_memory()
        self.returned_after = sum(self.calls.values())

    def release(self, *roles: str) -> None:
        """Close the engines of `roles` now (a role without one is skipped) and return their memory to the system
        (`return_memory`); an engine two roles share closes with the last of them."""
        held = [role for role in roles if role in self.engines]
        for role in held:
            self._release(role)
        if held:
            log.info("released engine(s): %s", ", ".join(held))
            self.return_memory()

    @contextmanager
    def training(self) -> Iterator[None]:
        """Around a training phase in this process: HF engines are released first (the trainer loads its own
        copy of the weights, so the policy's engine would be a second one) and rebuilt by the next `engine()` call
        from the checkpoint it names; the trainer's memory is returned after. vLLM engines are left as they are
        (`engines_asleep` puts those with sleep mode to sleep around a launched job)."""
        if not self.keep_engines:
            self.release(*[role for role, loaded in self.engines.items() if loaded.cfg.backend == "hf"])
        try:
            yield
        finally:
            if not self.keep_engines:
                self.return_memory()

    def _release(self, role: str) -> None:
        """Forget a role's engine; close it unless another role still uses the same object."""
        engine = self.engines.pop(role).engine
        if all(other.engine is not engine for other in self.engines.values()):
            self.weights.pop(id(engine), None)
            engine.close()

    def verifier(self, reward: str) -> Verifier:
        """The verifier process of a reward spec, started once."""
        if reward not in self.verifiers:
            self.verifiers[reward] = Verifier(reward)
        return self.verifiers[reward]

    def count(self, what: str, n: int = 1) -> None:
        self.calls[what] = self.calls.get(what, 0) + n

    def close(self) -> None:
        for role in list(self.engines):
            self._release(role)
        return_memory()
        for verifier in self.verifiers.values():
            verifier.close()
        self.verifiers.clear()


def return_memory() -> None:
    """Give freed memory back: collect cycles (a closed model may hang in one), trim glibc's heap (freed blocks
    stay in the process's resident set otherwise) and empty torch's CUDA cache."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _glibc():
    """glibc's handle when this process runs on it (malloc_trim is glibc's); None elsewhere (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


# ---------------------------------------------------------------------------------------------------------
# The stage table: bind a call, derive its key, execute it under the cache
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What a running stage gets besides its arguments: its fresh output folder, its key, the resources."""

    out: Path
    key: str
    res: Resources


@dataclass(frozen=True)
class _Stage:
    fn: Callable[..., dict[str, float]]
    kind: str
    datasets: dict[str, str]


STAGES: dict[str, _Stage] = {}


@dataclass(frozen=True)
class StageCall:
    """One stage call: the stage, its bound arguments (signature order, defaults applied) and its spec, built once."""

    stage: str
    arguments: dict[str, Any]
    spec: StageSpec

    @property
    def key(self) -> str:
        return self.spec.key


def stage(kind: str, *, datasets: dict[str, str] | None = None):
    """Register `fn(job, ...) -> metrics` as a stage; the name becomes `fn(..., res=res) -> ArtifactRef`."""
    def register(fn: Callable[..., dict[str, float]]) -> Callable[..., ArtifactRef]:
        STAGES[fn.__name__] = _Stage(fn, kind, dict(datasets or {}))

        @functools.wraps(fn)
        def call(*args, res: Resources, **kw) -> ArtifactRef:
            return execute(bind(fn.__name__, *args, **kw), res)
        return call
    return register


def bind(name: str, *args, **kw) -> StageCall:
    """Bind arguments to stage `name` and derive the call's key from them (a wrong argument fails here)."""
    entry = STAGES[name]
    params = list(inspect.signature(entry.fn).parameters.values())[1:]  # without `job`
    bound = inspect.Signature(params).bind(*args, **kw)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    return StageCall(name, arguments, derive_spec(name, entry.kind, arguments, entry.datasets))


def execute(call: StageCall, res: Resources) -> ArtifactRef:
    """Serve the call's verified output or compute it (`cached`), at the call's thread count."""
    fn = STAGES[call.stage].fn
    return cached(res, call.spec, lambda out, key: _threaded(call, fn, Job(out, key, res)))


def _threaded(call: StageCall, fn: Callable[..., dict[str, float]], job: Job) -> dict[str, float]:
    """Run the stage at its `threads` argument (torch's intra-op threads: a float sum's rounding depends on their
    number, so the count is in the key), putting the process's count back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(call.arguments.get("threads") or before)
    try:
        return fn(job, **call.arguments)
    finally:
        torch.set_num_threads(before)


def cached(res: Resources, spec: StageSpec, build: Callable[[Path, str], dict[str, float]]) -> ArtifactRef:
    """Serve the stage's verified output, or run `build(folder, key)` into a fresh folder and publish it; `res.force`
    recomputes even a valid output. The computation is one child run of the tracker. A miss takes the key's
    compute lock and looks again: a run computing the same key meanwhile (another process or worker on the same
    root) is waited for and its output served, so no key is computed twice at once."""
    key = spec.key
    ref = None if res.force else res.store.lookup(spec.stage, key)
    if ref is None:
        with res.store.computing(spec.stage, key):
            ref = None if res.force else res.store.lookup(spec.stage, key)
            if ref is None:
                return _compute(res, spec, build)
    log.info("%s %s: served from cache", spec.stage, key[:12])
    res.store.discard_work(spec.stage, key)  # a killed run's leftovers, now that the output exists
    return ref


def _compute(res: Resources, spec: StageSpec, build: Callable[[Path, str], dict[str, float]]) -> ArtifactRef:
    key = spec.key
    config = {type(c).__name__: c.model_dump(mode="json") for c in spec.configs.values()}
    config.update({"arguments": spec.scalars} if spec.scalars else {})
    log.info("%s %s: running", spec.stage, key[:12])
    start = time.perf_counter()
    with res.tracker.stage_run(spec.stage, key, config, spec.inputs) as run:
        with res.store.write(spec.stage, key, kind=spec.kind, version=VERSIONS[spec.stage], config=config,
                             inputs=spec.inputs, datasets=spec.datasets) as out:
            with measure() as peak:  # this process's peak RSS (and CUDA), plus a launched job's processes'
                metrics = build(Path(out.path), key)
            out.metrics.update(metrics)
            out.metrics.update(peak.metrics())
            out.metrics["wall_time_s"] = time.perf_counter() - start
        run.finish(out.ref, res.store.manifest(out.ref))
    res.store.discard_work(spec.stage, key)
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
