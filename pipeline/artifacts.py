"""References and digests, below every layer: `ArtifactRef` and the sha256 of a file or a folder.

Every layer names what it reads or writes by an `ArtifactRef` (kind, uri, sha256, schema version) and hashes files
the same way: the data layer for a prompt source, the store for a stage output, the stages for an external model.
Nothing here knows the store's layout beyond the two top-level files of an output folder that are not its content
(`manifest.json`, `pruned.json`), which every tree digest leaves out.

This is also the name Prefect's stored JSON results give the class (`pipeline.artifacts.ArtifactRef`); records
written while it lived in `pipeline.store.artifacts` load through the store's re-export.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ArtifactRef", "file_sha256", "hash_tree", "files_sha256", "tree_sha256", "MANIFEST", "PRUNED", "HEX64"]

MANIFEST = "manifest.json"
"""A stage output's manifest (how it was made, from what, what it holds); not part of the folder's digest."""
PRUNED = "pruned.json"
"""The relative paths a retention policy removed from a finished output (beside the manifest, not hashed)."""
HEX64 = r"^[0-9a-f]{64}$"


class ArtifactRef(BaseModel):
    """A small, JSON-serializable pointer to one stage output (a folder) or one file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(min_length=1)
    """What the artifact is, e.g. "prompts", "checkpoint", "eval"."""
    uri: str = Field(min_length=1)
    """Absolute path of the folder or file (in a manifest on disk, `<stage>/<key>` for an output of the same
    store, resolved against that store's root when read)."""
    sha256: str = Field(pattern=HEX64)
    """`tree_sha256` of a folder (manifest excluded) or `file_sha256` of a file."""
    schema_version: int = Field(ge=1)
    """Version of the artifact's on-disk format; readers check it before reading."""

    @property
    def path(self) -> Path:
        return Path(self.uri)


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in chunks."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def hash_tree(folder: str | Path) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under `folder` (recursively), the top-level manifest and prune
    record excluded. A missing folder raises NotADirectoryError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
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
