"""Prompt sources: which reader a source needs, the readers (hub dataset, `save_to_disk` folder, .parquet, .jsonl)
and the content digest of a local source (`source_ref`, part of the key of the stage that reads it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import ArtifactRef, file_sha256, tree_sha256
from pipeline.config import DataConfig

if TYPE_CHECKING:
    from pipeline.data.prompts import BadRow

__all__ = ["DataError", "Table", "READERS", "resolve_format", "source_ref"]


class DataError(ValueError):
    """A prompt set that cannot be used; the message names the file, the rows and the fields."""

    def __init__(self, message: str, bad_rows: Sequence[BadRow] = ()):
        super().__init__(message)
        self.bad_rows = list(bad_rows)


@dataclass(frozen=True)
class Table:
    """The records of one source, its columns, and the words that name it in errors."""

    records: list[dict[str, Any]]
    columns: list[str]
    origin: str


def resolve_format(cfg: DataConfig) -> str:
    """The reader for `cfg.source`: cfg.format, or with "auto": a `save_to_disk` folder -> disk, another
    folder -> hf (datasets' folder loader), .parquet / .jsonl -> that, anything not on disk -> a hub id."""
    if cfg.format != "auto":
        return cfg.format
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
        return "disk" if saved else "hf"
    if path.suffix in (".parquet", ".jsonl") and path.is_file():
        return path.suffix[1:]
    if path.exists():
        raise DataError(f"{path}: cannot tell the format from the name; set data.format to parquet or jsonl")
    if path.is_absolute() or cfg.source.startswith((".", "~")) or path.suffix in (".parquet", ".jsonl", ".json"):
        raise DataError(f"{path}: no such file or folder")
    return "hf"


def _read_hub(cfg: DataConfig) -> Table:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    except (OSError, ValueError) as exc:  # not found / offline / unknown split: name what was asked for
        raise DataError(f"dataset {cfg.source!r} split {cfg.split!r}: {exc}") from exc
    return Table(ds.to_list(), list(ds.column_names), f"dataset {cfg.source!r} split {cfg.split!r}")


def _local(cfg: DataConfig) -> Path:
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return path


def _read_disk(cfg: DataConfig) -> Table:
    import datasets

    _local(cfg)
    try:
        ds = datasets.load_from_disk(cfg.source)
    except (OSError, ValueError) as exc:
        raise DataError(f"{cfg.source}: not a datasets `save_to_disk` folder: {exc}") from exc
    origin = str(cfg.source)
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"{cfg.source}: no split {cfg.split!r}; available splits: {', '.join(ds)}")
        ds, origin = ds[cfg.split], f"{cfg.source} split {cfg.split!r}"
    return Table(ds.to_list(), list(ds.column_names), origin)


def _read_parquet(cfg: DataConfig) -> Table:
    path = _local(cfg)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read as parquet: {exc}") from exc
    return Table(table.to_pylist(), list(table.column_names), str(path))


def _read_jsonl(cfg: DataConfig) -> Table:
    path = _local(cfg)
    records, columns = [], {}
    try:
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {line_no}: invalid JSON: {exc}") from exc
                if not isinstance(rec, dict):
                    raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(rec).__name__}")
                records.append(rec)
                columns.update(dict.fromkeys(rec))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    return Table(records, list(columns), str(path))


def source_ref(cfg: DataConfig) -> ArtifactRef | None:
    """A reference to a local source with its content digest (file sha256, or tree sha256 of a folder), for the
    cache key of the stage that reads it: editing the file then invalidates the cache. None for "synthetic"
    (its config is the content) and for hub ids (their content is not known before loading)."""
    if cfg.source == "synthetic":
        return None
    if resolve_format(cfg) == "hf" and not Path(cfg.source).expanduser().is_dir():
        return None  # a hub id
    path = _local(cfg).resolve()
    sha = tree_sha256(path) if path.is_dir() else file_sha256(path)
    return ArtifactRef(kind="prompt_source", uri=str(path), sha256=sha, schema_version=1)


READERS = {"hf": _read_hub, "disk": _read_disk, "parquet": _read_parquet, "jsonl": _read_jsonl}


