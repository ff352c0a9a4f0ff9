"""Manifests and keys: what a stage output records about itself, its digest, and the one cache key.

A manifest on disk names outputs of the same store by store-relative uris (`<stage>/<key>`), resolved against the
folder's root when read, so a copied or moved root reads its own files. Its `digest` covers every other field
(config, inputs, metrics, file list); a manifest without one does not verify.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

import pipeline
from pipeline import artifacts as refs
from pipeline.artifacts import HEX64, MANIFEST, ArtifactRef, files_sha256

__all__ = ["ArtifactError", "Manifest", "named_inputs", "hash_tree", "tree_sha256", "stage_key", "check_name",
           "git_commit", "manifest_digest", "build_manifest", "resolved_config", "read_manifest"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class ArtifactError(RuntimeError):
    """An artifact or manifest that cannot be read or does not match its reference; the message names the path."""


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
    digest: str | None = Field(None, pattern=HEX64)
    """sha256 of every other field as written (`manifest_digest`); a manifest without it does not verify."""

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


def hash_tree(folder: str | Path) -> dict[str, str]:
    """`pipeline.artifacts.hash_tree`, a missing folder raised as ArtifactError."""
    try:
        return refs.hash_tree(folder)
    except NotADirectoryError as exc:
        raise ArtifactError(str(exc)) from exc


def tree_sha256(folder: str | Path) -> str:
    """Digest of a folder's content (`pipeline.artifacts.tree_sha256`); ArtifactError for a missing folder."""
    return files_sha256(hash_tree(folder))


def stage_key(stage: str, version: int, config_digest: str, input_digests: Sequence[str]) -> str:
    """The one cache key of a stage run: sha256 of a canonical JSON of its name, code version, config digest and
    input digests (in the order given). Prefect's `cache_key_fn` calls this same function."""
    check_name(stage, "stage")
    if isinstance(input_digests, str):
        raise TypeError("input_digests must be a sequence of digests, not one string")
    for i, d in enumerate([config_digest, *input_digests]):
        if not isinstance(d, str) or not d:
            what = "config_digest" if i == 0 else f"input_digests[{i - 1}]"
            raise ValueError(f"stage_key({stage!r}): {what} must be a non-empty string, got {d!r}")
    blob = json.dumps({"stage": stage, "version": int(version), "config": config_digest,
                       "inputs": list(input_digests)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def check_name(name: str, what: str) -> None:
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


def resolved_config(config: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """The config as a plain JSON dict, checked up front so a bad config fails before the stage does any work."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    try:
        json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"stage config is not JSON-serializable: {exc}") from exc
    return data


def build_manifest(tmp: Path, final: Path, *, kind: str, version: int, config: dict[str, Any],
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


def read_manifest(folder: Path) -> Manifest:
    """The manifest of `folder`, its digest present and matching, its store-relative references resolved against
    the folder's root (`<root>/<stage>/<key>`), wherever that root is now."""
    path = folder / MANIFEST
    try:
        m = Manifest.model_validate_json(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ArtifactError(f"{path}: no manifest") from exc
    except ValueError as exc:
        raise ArtifactError(f"{path}: unreadable manifest: {exc}") from exc
    if m.digest is None:
        raise ArtifactError(f"{path}: the manifest has no digest, so its fields cannot be verified (altered, or "
                            "written before manifests had one)")
    if m.digest != manifest_digest(m):
        raise ArtifactError(f"{path}: the manifest's fields do not match its digest (altered or damaged)")
    return _resolve_refs(m, folder.parent.parent)


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
