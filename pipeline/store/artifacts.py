"""The verified stage store: stage outputs under `<root>/<stage>/<key>/`, each with a manifest.

A stage's output lives at `<root>/<stage>/<key>/` with a `manifest.json` recording the config, the inputs, every
file's sha256 and the run's metrics; `key = stage_key(stage, version, config digest, input digests)`. A folder is
written as `.tmp-<key>-<random>` and renamed into place only once complete, and `lookup` re-hashes every file
before serving it, so a killed, altered or half-written output is recomputed, never served. References and digests
live in `pipeline.artifacts`, manifests and keys in `manifests`, the locks in `locks`; this module re-exports them.

A finished round may be pruned by the run's retention policy (`prune`): only the stages of `PRUNABLE`, and only
their folders listed there (a round's `state/` and `model/`). The removed files are recorded in `pruned.json`
beside the manifest, naming the output's digest and sealed with the root's retention key (`RETENTION_KEY`, made by
the first prune and copied with the root), so only the store's own prune writes a record that verifies. Its reference and digest stay those of the complete output, so
the keys downstream do not change, and `lookup` still serves it as the round's history and key. Any other missing
file (a pruned.json in an SFT output, a file outside the prunable folders, a record naming other content) is a
damaged output: recomputed, never served. A stage never computes from an input of the store that lost files
(`write` refuses it, naming the role), so a pruned round is never read as a model: the run recomputes it first
(same key, same bytes).

Computing a key is serialised by `.compute-<key>.lock` (`StageStore.computing`): of several runs that need the same
stage at once one computes and the others are served.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.artifacts import MANIFEST, PRUNED, ArtifactRef, file_sha256, files_sha256
from pipeline.atomic import fsync_dir, write_text_atomic
from pipeline.store.locks import compute_lock, new_lock, remove, try_lock
from pipeline.store.manifests import (ArtifactError, Manifest, build_manifest, check_name, git_commit, hash_tree,
                                      manifest_digest, named_inputs, read_manifest, resolved_config, stage_key,
                                      tree_sha256)

__all__ = [
    "ArtifactRef", "Manifest", "PendingOutput", "StageStore", "ArtifactError", "named_inputs",
    "file_sha256", "tree_sha256", "files_sha256", "hash_tree", "stage_key", "git_commit", "write_text_atomic",
    "manifest_digest", "MANIFEST", "PRUNED", "PRUNABLE",
]

log = logging.getLogger(__name__)

PRUNABLE: dict[str, tuple[str, ...]] = {"gft_round": ("state/", "model/"), "grpo_round": ("state/", "model/")}
"""The stages whose finished outputs a retention policy may prune, and the folders it may remove from them."""


@dataclass
class PendingOutput:
    """What `StageStore.write` yields: write files under `path`, set `metrics`; `ref` is set on success."""

    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    ref: ArtifactRef | None = None


class StageStore:
    """Stage outputs under `root/<stage>/<key>/`, each with a manifest; `lookup` serves only verified folders."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def folder(self, stage: str, key: str) -> Path:
        check_name(stage, "stage")
        check_name(key, "key")
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        """Where a stage keeps resumable work while it computes `key` (SFT's checkpoints): outside the temp folder,
        so a rerun after a kill resumes from it; `discard_work` removes it once the output is published or served."""
        return self.folder(stage, key).parent / f".ckpt-{key}"

    def discard_work(self, stage: str, key: str) -> None:
        shutil.rmtree(self.work_dir(stage, key), ignore_errors=True)

    @contextmanager
    def computing(self, stage: str, key: str) -> Iterator[None]:
        """Hold the exclusive compute lock of (stage, key), waiting while another writer holds it (a thread, a
        process, or a machine sharing the root through a file system with `flock`, such as NFS v4)."""
        with compute_lock(self.folder(stage, key).parent, key, f"{stage}/{key}"):
            yield

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The verified output of (stage, key), or None so that the caller recomputes: an output that is there but
        not served is logged with the reason (a warning); one never written is no news (debug; a caller looks up
        a key more than once, and the runtime says when the stage runs)."""
        folder = self.folder(stage, key)
        if not folder.exists():
            log.debug("cache miss %s/%s: no output folder", stage, key)
            return None
        try:
            return self._ref(folder, self._verified_manifest(folder, stage, key))
        except ArtifactError as exc:
            log.warning("cache miss %s/%s: %s; the stage will recompute", stage, key, exc)
            return None

    def _verified_manifest(self, folder: Path, stage: str, key: str) -> Manifest:
        """The manifest of a folder that matches it exactly (same files, same digests, nothing missing but what
        retention legitimately pruned); else ArtifactError."""
        self._inside(folder)
        m = read_manifest(folder)
        if (m.stage, m.key) != (stage, key):
            raise ArtifactError(f"{folder}: manifest is for {m.stage}/{m.key}")
        if m.output.sha256 != files_sha256(m.files):
            raise ArtifactError(f"{folder}: the manifest's output digest does not match its file list")
        try:
            on_disk = hash_tree(folder)
        except OSError as exc:  # e.g. moved aside by a writer replacing it while we read
            raise ArtifactError(f"{folder}: cannot read: {exc}") from exc
        pruned = _pruned_record(folder, m)
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
    def _ref(folder: Path, m: Manifest) -> ArtifactRef:
        """The manifest's output ref, pointing at where the folder is now (the store root may have moved)."""
        return m.output.model_copy(update={"uri": str(folder)})

    def pruned(self, ref: ArtifactRef) -> frozenset[str]:
        """The files of a stage output that are gone (pruned by retention, or lost): those its manifest lists and
        the folder lacks. Empty for a complete output and for a reference that is no stage output (no manifest)."""
        if not (ref.path / MANIFEST).is_file():
            return frozenset()
        try:
            files = read_manifest(ref.path).files
        except ArtifactError:
            return frozenset()  # not served anyway: lookup refuses it, and `write` checks inputs itself
        return frozenset(rel for rel in files if not (ref.path / rel).is_file())

    def prune(self, ref: ArtifactRef, prefixes: Sequence[str]) -> int:
        """Remove the output's files under `prefixes` (e.g. "state/"), recording them in `pruned.json` first, so a
        kill midway leaves an output that still verifies. Returns the bytes freed. Only verified outputs of this
        store's `PRUNABLE` stages are pruned, and only in the folders listed there."""
        folder = ref.path
        stage = folder.parent.name
        allowed = PRUNABLE.get(stage, ())
        if not all(p in allowed for p in prefixes):
            raise ArtifactError(f"{folder}: retention prunes only {list(allowed)} of a {stage} output, not "
                                f"{list(prefixes)}")
        m = self._verified_manifest(folder, stage, folder.name)
        if m.output.sha256 != ref.sha256:
            raise ArtifactError(f"{folder}: holds content {m.output.sha256[:12]}..., the reference says "
                                f"{ref.sha256[:12]}...")
        gone = sorted(rel for rel in m.files if rel.startswith(tuple(prefixes)))
        if not gone:
            return 0
        listed = sorted(set(gone) | _pruned_record(folder, m))
        record = {"output_sha256": m.output.sha256, "files": listed,
                  "mac": _record_mac(self.root, m.output.sha256, listed, create=True)}
        write_text_atomic(folder / PRUNED, json.dumps(record, indent=1))
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
        m = read_manifest(ref.path)
        if m.output.sha256 != ref.sha256:
            raise ArtifactError(f"{ref.path / MANIFEST}: describes content {m.output.sha256[:12]}..., "
                                f"the reference says {ref.sha256[:12]}...")
        return m

    def check_inputs(self, inputs: Mapping[str, ArtifactRef]) -> None:
        """Refuse to compute from an output of this store that lost files (a pruned round, a damaged folder): the
        error names the role, the folder and what is gone, so the caller recomputes that input first."""
        for role, ref in inputs.items():
            if ref.path.is_relative_to(self.root) and (gone := self.pruned(ref)):
                raise ArtifactError(f"input {role!r} ({ref.path}) lacks {sorted(gone)[:3]} ({len(gone)} files): it "
                                    "was pruned or damaged; recompute it (same key) before computing from it")

    @contextmanager
    def write(self, stage: str, key: str, *, kind: str, version: int, config: Mapping[str, Any] | BaseModel,
              inputs: Mapping[str, ArtifactRef] | Sequence[ArtifactRef], datasets: Mapping[str, str] | None = None,
              schema_version: int = 1) -> Iterator[PendingOutput]:
        """Write the output of (stage, key): yields a `PendingOutput` whose `path` is a fresh temp folder. `inputs`
        names each input by role (a legacy sequence becomes input0, input1, ...) and must be complete;
        `datasets` declares the folder's dataset files with the context a consumer logs them under. On normal exit
        the files are hashed, the manifest written and the folder renamed to `root/<stage>/<key>` (an invalid old
        folder there is replaced; a valid one, written meanwhile by another writer, is kept and served). On an
        exception the temp folder is removed and the exception re-raised."""
        final = self.folder(stage, key)
        config = resolved_config(config)
        inputs = {str(role): ArtifactRef.model_validate(r) for role, r in named_inputs(inputs).items()}
        self.check_inputs(inputs)
        datasets = {str(name): str(context) for name, context in (datasets or {}).items()}
        final.parent.mkdir(parents=True, exist_ok=True)
        self.clean_stale(stage)
        lock = new_lock(final.parent, key)
        tmp = lock.temp_folder
        try:
            tmp.mkdir()
            pending = PendingOutput(tmp)
            start = time.monotonic()
            yield pending
            m = build_manifest(tmp, final, kind=kind, version=version, config=config, inputs=inputs,
                               datasets=datasets, schema_version=schema_version, metrics=pending.metrics,
                               wall_time_s=time.monotonic() - start)
            write_text_atomic(tmp / MANIFEST, m.model_dump_json(indent=2))
            pending.ref = self._publish(tmp, final, m)
        except Exception as exc:
            _raise_if_disk_full(self.root, exc)
            raise
        finally:
            try:
                remove(tmp)  # still there only when the body or publishing failed
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
                if not (final / PRUNED).exists():
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
            remove(aside)
        raise ArtifactError(f"{final}: could not publish the output (the folder keeps reappearing)")

    def clean_stale(self, stage: str) -> list[Path]:
        """Remove the temp folders (and lock files) of `stage` left by dead writers: those whose lock is free.
        Returns the removed temp folders."""
        check_name(stage, "stage")
        folder = self.root / stage
        if not folder.is_dir():
            return []
        tokens = {p.name.removeprefix(".tmp-").removesuffix(".lock").removesuffix(".old")
                  for p in folder.glob(".tmp-*")}
        removed = []
        for token in sorted(tokens):
            lock = try_lock(folder / f".tmp-{token}.lock")
            if lock is None:
                continue  # a live writer holds it
            try:
                for path in (folder / f".tmp-{token}", folder / f".tmp-{token}.old"):
                    if remove(path):
                        log.info("removed stale temp folder %s", path)
                        removed.append(path)
            finally:
                lock.release()
        return removed


def _pruned_record(folder: Path, m: Manifest) -> set[str]:
    """The files a legitimate retention record lists: `pruned.json` of a `PRUNABLE` stage, naming this output's
    digest, listing only files of the manifest under the stage's prunable folders, sealed with the root's retention
    key. Anything else (no record, an unreadable, planted or unsealed one, one copied from other content) lists
    nothing, so the missing files fail verification."""
    try:
        record = json.loads((folder / PRUNED).read_text())
    except (OSError, ValueError):
        return set()
    allowed = PRUNABLE.get(m.stage, ())
    if not isinstance(record, dict) or record.get("output_sha256") != m.output.sha256 or not allowed:
        return set()
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and f.startswith(allowed) for f in files):
        return set()
    mac = _record_mac(folder.parent.parent, m.output.sha256, files, create=False)
    if mac is None or not hmac.compare_digest(str(record.get("mac", "")), mac):
        return set()
    return set(files) & set(m.files)


RETENTION_KEY = ".retention-key"
"""A random key at the store's root (made by the first `prune`, copied with the root) that seals each `pruned.json`:
only the store's own prune writes a record that verifies, so planting one does not excuse a deleted file."""


def _record_mac(root: Path, output_sha256: str, files: Sequence[str], *, create: bool) -> str | None:
    """HMAC-SHA256 of a prune record under the root's retention key (None when the root has none and `create` is
    off)."""
    path = root / RETENTION_KEY
    if create and not path.is_file():
        tmp = write_text_atomic(root / f".{RETENTION_KEY}.{secrets.token_hex(4)}", secrets.token_hex(32))
        try:
            os.link(tmp, path)  # appears whole or not at all; of two first prunes at once, one key wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        key = path.read_text().strip()
    except OSError:
        return None
    if not key:
        return None
    body = json.dumps({"output_sha256": output_sha256, "files": sorted(files)}, sort_keys=True)
    return hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()


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
