"""Artifacts: references, digests, stage keys, manifests and the verified stage store.

Stages pass `ArtifactRef`s (kind, uri, sha256, schema version), never objects. A stage's output lives at
`<root>/<stage>/<key>/` with a `manifest.json` recording the config, the inputs, every file's sha256 and
the run's metrics; `key = stage_key(stage, version, config digest, input digests)`. A folder is written as
`.tmp-<key>-<random>` and renamed into place only once complete, and `lookup` re-hashes every file before
serving it, so a killed, altered or half-written output is recomputed, never served.

Inside a manifest on disk, references to outputs of the same store are store-relative (`<stage>/<key>`) and
resolved against the folder's root when read, so a copied or moved root reads its own files, never the old
root's. The manifest's `digest` covers every other field (config, inputs, metrics, file list), so what plots
and lineage read from it is verified like the files are.

A finished output may be pruned by the run's retention policy (`prune`): the listed files are removed and
recorded in `pruned.json` beside the manifest. Its reference and digest stay those of the complete output, so
the keys downstream do not change; `lookup` serves it (a later round still continues the chain), and
`pruned(ref)` says what is gone, so a caller that needs those files recomputes the output (same key, same
bytes) before it reads them.

A writer holds an exclusive `flock` on `.tmp-<key>-<random>.lock` while its temp folder exists. The kernel
drops the lock when the process dies (kill -9 included), so the next write of the stage removes exactly the
temp folders whose lock is free and leaves the ones of live writers (other threads or processes) alone.

Computing a key is serialised by a second lock, `.compute-<key>.lock` (`StageStore.computing`): a caller that
finds no output takes it, waiting while another thread, process or machine on the same root holds it, then looks
the output up again, so of several runs that need the same stage at once one computes and the others are served.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

import pipeline
from pipeline.atomic import fsync_dir, write_text_atomic

__all__ = [
    "ArtifactRef", "Manifest", "PendingOutput", "StageStore", "ArtifactError", "named_inputs",
    "file_sha256", "tree_sha256", "files_sha256", "hash_tree", "stage_key", "git_commit", "write_text_atomic",
    "manifest_digest", "PRUNED",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PRUNED = "pruned.json"
"""The relative paths a retention policy removed from a finished output (beside the manifest, not hashed)."""
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_HEX64 = r"^[0-9a-f]{64}$"


class ArtifactError(RuntimeError):
    """An artifact or manifest that cannot be read or does not match its reference; the message names the path."""


class ArtifactRef(BaseModel):
    """A small, JSON-serializable pointer to one stage output (a folder) or one file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(min_length=1)
    """What the artifact is, e.g. "prompts", "checkpoint", "eval"."""
    uri: str = Field(min_length=1)
    """Absolute path of the folder or file (in a manifest on disk, `<stage>/<key>` for an output of the same
    store, resolved against that store's root when read)."""
    sha256: str = Field(pattern=_HEX64)
    """`tree_sha256` of a folder (manifest excluded) or `file_sha256` of a file."""
    schema_version: int = Field(ge=1)
    """Version of the artifact's on-disk format; readers check it before reading."""

    @property
    def path(self) -> Path:
        return Path(self.uri)


class Manifest(BaseModel):
    """`manifest.json` of one stage output: how it was made, from what, and what it holds."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    stage: str
    key: str
    version: int
    """The stage's code version (STAGE_VERSION) that produced the output."""
    config: dict[str, Any]
    """The resolved stage settings."""
    inputs: dict[str, ArtifactRef]
    """Role -> reference of every input (the stage function's argument names, e.g. "prompts", "prev"); manifests
    written before inputs had roles list them, read here as "input0", "input1", ..."""
    datasets: dict[str, str] = Field(default_factory=dict)
    """File name in the folder -> the MLflow dataset context a consumer logs it under, e.g.
    {"groups.parquet": "training"}; empty in manifests written before outputs declared their datasets."""
    files: dict[str, str]
    """Relative POSIX path -> sha256 of every file in the folder except the manifest."""
    package_version: str
    git_commit: str | None
    created_at: datetime
    wall_time_s: float
    metrics: dict[str, float]
    """Stage metrics; NaN and inf are kept (written as JSON constants)."""
    output: ArtifactRef
    digest: str | None = Field(None, pattern=_HEX64)
    """sha256 of every other field as written (`manifest_digest`); None in manifests written before it existed."""

    @field_validator("inputs", mode="before")
    @classmethod
    def _roles_of_old_lists(cls, value: Any) -> Any:
        """An old manifest's list of inputs -> {"input0": ..., "input1": ...}, so existing run roots still load."""
        return named_inputs(value) if isinstance(value, (list, tuple)) else value


def named_inputs(inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """Inputs by role: a mapping as given, a (legacy) sequence as {"input0": ..., "input1": ...}."""
    if isinstance(inputs, Mapping):
        return dict(inputs)
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be a mapping of role -> reference or a sequence of references")
    return {f"input{i}": ref for i, ref in enumerate(inputs)}


# ---------------------------------------------------------------------------------------------------------
# Digests and keys
# ---------------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in chunks."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def hash_tree(folder: str | Path) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under `folder` (recursively), the top-level manifest and prune
    record excluded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a folder")
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel not in (MANIFEST, PRUNED) and path.is_file():
            out[rel] = file_sha256(path)
    return out


def files_sha256(files: Mapping[str, str]) -> str:
    """The tree digest of a {relpath: sha256} listing: sha256 over the sorted (path, file digest) pairs."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


def tree_sha256(folder: str | Path) -> str:
    """Digest of a folder's content: sorted relative paths and each file's sha256 (the manifest excluded)."""
    return files_sha256(hash_tree(folder))


def stage_key(stage: str, version: int, config_digest: str, input_digests: Sequence[str]) -> str:
    """The one cache key of a stage run: sha256 of a canonical JSON of its name, code version, config digest and
    input digests (in the order given). Prefect's `cache_key_fn` calls this same function."""
    _check_name(stage, "stage")
    if isinstance(input_digests, str):
        raise TypeError("input_digests must be a sequence of digests, not one string")
    for i, d in enumerate([config_digest, *input_digests]):
        if not isinstance(d, str) or not d:
            what = "config_digest" if i == 0 else f"input_digests[{i - 1}]"
            raise ValueError(f"stage_key({stage!r}): {what} must be a non-empty string, got {d!r}")
    blob = json.dumps({"stage": stage, "version": int(version), "config": config_digest,
                       "inputs": list(input_digests)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_name(name: str, what: str) -> None:
    """Stage names and keys become folder names: no separators, no leading dot (reserved for temp folders)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a safe folder name (letters, digits, '_', '-', '.'; "
                         f"not starting with '.' or '-')")


@functools.cache
def git_commit() -> str | None:
    """HEAD of the git repository holding this package, or None (not a checkout, no git, or git fails)."""
    pkg_dir = Path(pipeline.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(pkg_dir), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("git commit unavailable: %s", exc)
        return None
    lines = out.stdout.split()
    # The package must sit at the top of that repository, not inside some unrelated checkout (a venv in a repo).
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != pkg_dir.parent:
        return None
    return lines[1]


# ---------------------------------------------------------------------------------------------------------
# The stage store
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PendingOutput:
    """What `StageStore.write` yields: write files under `path`, set `metrics`; `ref` is set on success."""

    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    ref: ArtifactRef | None = None


@dataclass
class _TempLock:
    """An exclusive flock on `.tmp-<token>.lock`, held while the temp folder `.tmp-<token>` exists."""

    lock_path: Path
    fd: int

    @property
    def temp_folder(self) -> Path:
        return self.lock_path.with_suffix("")

    def release(self) -> None:
        self.lock_path.unlink(missing_ok=True)
        os.close(self.fd)


class StageStore:
    """Stage outputs under `root/<stage>/<key>/`, each with a manifest; `lookup` serves only verified folders."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def folder(self, stage: str, key: str) -> Path:
        _check_name(stage, "stage")
        _check_name(key, "key")
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        """Where a stage keeps resumable work while it computes `key` (SFT's checkpoints): outside the temp folder,
        so a rerun after a kill resumes from it; `discard_work` removes it once the output is published or served."""
        _check_name(stage, "stage")
        _check_name(key, "key")
        return self.root / stage / f".ckpt-{key}"

    def discard_work(self, stage: str, key: str) -> None:
        shutil.rmtree(self.work_dir(stage, key), ignore_errors=True)

    @contextmanager
    def computing(self, stage: str, key: str) -> Iterator[None]:
        """Hold the exclusive compute lock of (stage, key), waiting while another writer holds it (a thread, a
        process, or a machine sharing the root through a file system with `flock`, such as NFS v4). The lock file
        stays (removing it could let two writers lock two different files); the kernel drops the lock when its
        holder dies."""
        folder = self.folder(stage, key).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f".compute-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s/%s: another writer is computing it; waiting for it", stage, key)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The verified output of (stage, key), or None (logged with the reason) so that the caller recomputes."""
        folder = self.folder(stage, key)
        if not folder.exists():
            log.info("cache miss %s/%s: no output folder", stage, key)
            return None
        try:
            return self._ref(folder, self._verified_manifest(folder, stage, key))
        except ArtifactError as exc:
            log.warning("cache miss %s/%s: %s; the stage will recompute", stage, key, exc)
            return None

    def _verified_manifest(self, folder: Path, stage: str, key: str) -> Manifest:
        """The manifest of a folder that matches it exactly (same files, same digests); else ArtifactError."""
        self._inside(folder)
        m = self._read_manifest(folder)
        if (m.stage, m.key) != (stage, key):
            raise ArtifactError(f"{folder}: manifest is for {m.stage}/{m.key}")
        if m.output.sha256 != files_sha256(m.files):
            raise ArtifactError(f"{folder}: the manifest's output digest does not match its file list")
        try:
            on_disk = hash_tree(folder)
        except OSError as exc:  # e.g. moved aside by a writer replacing it while we read
            raise ArtifactError(f"{folder}: cannot read: {exc}") from exc
        pruned = _pruned_files(folder)
        for rel in sorted(set(m.files) | set(on_disk)):
            if rel not in on_disk and rel in pruned:
                continue  # removed by the retention policy; the reference still names the complete output
            if rel not in on_disk:
                raise ArtifactError(f"{folder}: file {rel!r} is missing")
            if rel not in m.files:
                raise ArtifactError(f"{folder}: file {rel!r} is not in the manifest")
            if on_disk[rel] != m.files[rel]:
                raise ArtifactError(f"{folder}: file {rel!r} has sha256 {on_disk[rel][:12]}..., "
                                    f"the manifest says {m.files[rel][:12]}...")
        return m

    def _inside(self, folder: Path) -> None:
        """Serve only content that lives in the store: no symlink in a stage output (the pipeline writes none), and
        the folder itself resolving inside the root (a stage folder replaced by a link to a matching copy elsewhere
        is refused, not served)."""
        if not folder.resolve().is_relative_to(self.root.resolve()):
            raise ArtifactError(f"{folder}: resolves to {folder.resolve()}, outside the store {self.root}")
        links = [p for p in [folder, *folder.rglob("*")] if p.is_symlink()]
        if links:
            raise ArtifactError(f"{folder}: {links[0].relative_to(folder.parent).as_posix()} is a symlink; a stage "
                                "output is served only from files inside the store")

    @staticmethod
    def _read_manifest(folder: Path) -> Manifest:
        """The manifest of `folder`, its digest checked and its store-relative references resolved against the
        folder's root (`<root>/<stage>/<key>`), wherever that root is now."""
        path = folder / MANIFEST
        try:
            m = Manifest.model_validate_json(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ArtifactError(f"{path}: no manifest") from exc
        except ValueError as exc:
            raise ArtifactError(f"{path}: unreadable manifest: {exc}") from exc
        if m.digest is not None and m.digest != manifest_digest(m):
            raise ArtifactError(f"{path}: the manifest's fields do not match its digest (altered or damaged)")
        return _resolve_refs(m, folder.parent.parent)

    @staticmethod
    def _ref(folder: Path, m: Manifest) -> ArtifactRef:
        """The manifest's output ref, pointing at where the folder is now (the store root may have moved)."""
        return m.output.model_copy(update={"uri": str(folder)})

    def pruned(self, ref: ArtifactRef) -> frozenset[str]:
        """The files of a stage output that the retention policy removed (empty for a complete output)."""
        return frozenset(_pruned_files(ref.path))

    def prune(self, ref: ArtifactRef, prefixes: Sequence[str]) -> int:
        """Remove the output's files under `prefixes` (e.g. "state/"), recording them in `pruned.json` first, so a
        kill midway leaves an output that still verifies. Returns the bytes freed. Only verified outputs of this
        store are pruned."""
        folder = ref.path
        m = self._verified_manifest(folder, folder.parent.name, folder.name)
        if m.output.sha256 != ref.sha256:
            raise ArtifactError(f"{folder}: holds content {m.output.sha256[:12]}..., the reference says "
                                f"{ref.sha256[:12]}...")
        gone = sorted(rel for rel in m.files if rel.startswith(tuple(prefixes)))
        if not gone:
            return 0
        write_text_atomic(folder / PRUNED, json.dumps(sorted(set(gone) | _pruned_files(folder)), indent=1))
        freed = 0
        for rel in gone:
            path = folder / rel
            if path.is_file():
                freed += path.stat().st_size
                path.unlink()
        _remove_empty_dirs(folder)
        return freed

    def manifest(self, ref: ArtifactRef) -> Manifest:
        """The manifest of a stage output; raises ArtifactError when it is missing or describes other content."""
        m = self._read_manifest(ref.path)
        if m.output.sha256 != ref.sha256:
            raise ArtifactError(f"{ref.path / MANIFEST}: describes content {m.output.sha256[:12]}..., "
                                f"the reference says {ref.sha256[:12]}...")
        return m

    @contextmanager
    def write(self, stage: str, key: str, *, kind: str, version: int, config: Mapping[str, Any] | BaseModel,
              inputs: Mapping[str, ArtifactRef] | Sequence[ArtifactRef], datasets: Mapping[str, str] | None = None,
              schema_version: int = 1) -> Iterator[PendingOutput]:
        """Write the output of (stage, key): yields a `PendingOutput` whose `path` is a fresh temp folder. `inputs`
        names each input by role (a legacy sequence becomes input0, input1, ...); `datasets` declares the folder's
        dataset files with the context a consumer logs them under. On normal
        exit the files are hashed, the manifest written and the folder renamed to `root/<stage>/<key>` (an
        invalid old folder there is replaced; a valid one, written meanwhile by another writer, is kept and
        served). On an exception the temp folder is removed and the exception re-raised."""
        final = self.folder(stage, key)
        config = _resolved_config(config)
        inputs = {str(role): ArtifactRef.model_validate(r) for role, r in named_inputs(inputs).items()}
        datasets = {str(name): str(context) for name, context in (datasets or {}).items()}
        final.parent.mkdir(parents=True, exist_ok=True)
        self.clean_stale(stage)
        lock = _new_lock(final.parent, key)
        tmp = lock.temp_folder
        try:
            tmp.mkdir()
            pending = PendingOutput(tmp)
            start = time.monotonic()
            yield pending
            m = _build_manifest(tmp, final, kind=kind, version=version, config=config, inputs=inputs,
                                datasets=datasets, schema_version=schema_version, metrics=pending.metrics,
                                wall_time_s=time.monotonic() - start)
            write_text_atomic(tmp / MANIFEST, m.model_dump_json(indent=2))
            pending.ref = self._publish(tmp, final, m)
        except Exception as exc:
            _raise_if_disk_full(self.root, exc)
            raise
        finally:
            try:
                _remove(tmp)  # still there only when the body or publishing failed
            finally:
                lock.release()

    def _publish(self, tmp: Path, final: Path, m: Manifest) -> ArtifactRef:
        """Rename the complete temp folder into place; move an invalid old folder aside first, then remove it."""
        stage, key = final.parent.name, final.name
        for _ in range(3):
            try:
                tmp.rename(final)
                fsync_dir(final.parent)
                return self._ref(final, m)
            except OSError:
                if not final.exists():
                    raise
            try:
                kept = self._verified_manifest(final, stage, key)
                if not _pruned_files(final):
                    log.info("%s/%s: another writer finished first; keeping its output", stage, key)
                    return self._ref(final, kept)
                log.info("%s/%s: replacing a pruned output with the complete one", stage, key)
            except ArtifactError as exc:
                log.warning("%s/%s: replacing an invalid output (%s)", stage, key, exc)
            aside = tmp.with_name(tmp.name + ".old")  # guarded by our lock until removed
            try:
                final.rename(aside)
            except FileNotFoundError:
                continue  # someone else moved it meanwhile; try the rename again
            _remove(aside)
        raise ArtifactError(f"{final}: could not publish the output (the folder keeps reappearing)")

    def clean_stale(self, stage: str) -> list[Path]:
        """Remove the temp folders (and lock files) of `stage` left by dead writers: those whose lock is free.
        Returns the removed temp folders."""
        _check_name(stage, "stage")
        folder = self.root / stage
        if not folder.is_dir():
            return []
        tokens = {p.name.removeprefix(".tmp-").removesuffix(".lock").removesuffix(".old")
                  for p in folder.glob(".tmp-*")}
        removed = []
        for token in sorted(tokens):
            lock = _try_lock(folder / f".tmp-{token}.lock")
            if lock is None:
                continue  # a live writer holds it
            try:
                for path in (folder / f".tmp-{token}", folder / f".tmp-{token}.old"):
                    if _remove(path):
                        log.info("removed stale temp folder %s", path)
                        removed.append(path)
            finally:
                lock.release()
        return removed


# ---------------------------------------------------------------------------------------------------------
# Helpers of `write`
# ---------------------------------------------------------------------------------------------------------


def _resolved_config(config: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """The config as a plain JSON dict, checked up front so a bad config fails before the stage does any work."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    try:
        json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"stage config is not JSON-serializable: {exc}") from exc
    return data


def _build_manifest(tmp: Path, final: Path, *, kind: str, version: int, config: dict[str, Any],
                    inputs: dict[str, ArtifactRef], datasets: dict[str, str], schema_version: int,
                    metrics: Mapping[str, Any], wall_time_s: float) -> Manifest:
    """The manifest of the complete temp folder `tmp`, describing it as it will be at `final`."""
    stage, key = final.parent.name, final.name
    files = hash_tree(tmp)
    try:
        metrics = {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{stage}/{key}: metrics must be numbers: {exc}") from exc
    root = final.parent.parent
    output = ArtifactRef(kind=kind, uri=f"{stage}/{key}", sha256=files_sha256(files), schema_version=schema_version)
    missing = sorted(set(datasets) - set(files))
    if missing:
        raise ArtifactError(f"{stage}/{key}: declared dataset files {missing} were not written")
    m = Manifest(stage=stage, key=key, version=version, config=config,
                 inputs={role: _store_relative(ref, root) for role, ref in inputs.items()}, datasets=datasets,
                 files=files, package_version=pipeline.__version__, git_commit=git_commit(),
                 created_at=datetime.now(timezone.utc), wall_time_s=wall_time_s, metrics=metrics, output=output)
    return m.model_copy(update={"digest": manifest_digest(m)})


def manifest_digest(m: Manifest) -> str:
    """sha256 of a manifest's fields other than `digest`, as canonical JSON (sorted keys; NaN and inf as constants)."""
    data = json.loads(m.model_dump_json(exclude={"digest"}))
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _store_relative(ref: ArtifactRef, root: Path) -> ArtifactRef:
    """`ref` with a store-relative uri when it names something inside the store at `root` (an output, a member folder
    of one), else unchanged (an external model, a prompt source)."""
    path = Path(ref.uri)
    if path.is_absolute() and path.is_relative_to(root):
        return ref.model_copy(update={"uri": path.relative_to(root).as_posix()})
    return ref


def _resolve_refs(m: Manifest, root: Path) -> Manifest:
    """The manifest with its store-relative uris (inputs and output) made absolute under `root`."""
    def absolute(ref: ArtifactRef) -> ArtifactRef:
        return ref if Path(ref.uri).is_absolute() else ref.model_copy(update={"uri": str(root / ref.uri)})
    return m.model_copy(update={"inputs": {role: absolute(r) for role, r in m.inputs.items()},
                                "output": absolute(m.output)})


def _pruned_files(folder: Path) -> set[str]:
    """The relative paths `pruned.json` lists (empty when there is none; an unreadable one lists nothing, so the
    missing files fail verification)."""
    try:
        listed = json.loads((folder / PRUNED).read_text())
    except (OSError, ValueError):
        return set()
    return {str(rel) for rel in listed} if isinstance(listed, list) else set()


def _remove_empty_dirs(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


LOW_DISK_BYTES = 64 * 2**20
"""Below this much free space, a failed write is reported as a full disk (whatever the writer's own error says)."""


def _raise_if_disk_full(root: Path, exc: BaseException) -> None:
    """A write that failed on a (nearly) full disk says so: torch's zip writer reports "unexpected pos", safetensors
    and pyarrow their own words; the free space under the root is what decides."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return
    if free < LOW_DISK_BYTES or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        raise OSError(errno.ENOSPC, f"no space left on the device of {root}: {free / 2**20:.0f} MiB free; the stage "
                      f"wrote nothing (its temp folder is removed). Free space, or move `root` (the write failed "
                      f"with: {type(exc).__name__}: {exc})") from exc


def _try_lock(lock_path: Path) -> _TempLock | None:
    """The lock if it is free (or its file is gone), None while another writer holds it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None  # the stage folder itself vanished
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return _TempLock(lock_path, fd)


def _new_lock(folder: Path, key: str) -> _TempLock:
    """Hold the lock of a fresh temp token `<key>-<random>` in `folder`. A cleaner may take and unlink a lock file
    between our open and our flock, leaving us an orphaned inode: check that the path still names our file."""
    for _ in range(3):
        lock = _try_lock(folder / f".tmp-{key}-{secrets.token_hex(6)}.lock")
        if lock is not None and _still_linked(lock):
            return lock
        if lock is not None:
            os.close(lock.fd)
    raise ArtifactError(f"{folder}: could not take a writer lock for key {key!r}")


def _still_linked(lock: _TempLock) -> bool:
    try:
        return os.fstat(lock.fd).st_ino == lock.lock_path.stat().st_ino
    except FileNotFoundError:
        return False


def _remove(path: Path) -> bool:
    """Remove a folder or file if it exists; True when something was removed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return False
    return True
