"""Prompt sources: which reader a source needs, the readers (hub dataset, `save_to_disk` folder, .parquet, .jsonl),
the column settings as paths into a row (`column_path`, `check_columns`) and the content digest of a local source
(`source_ref`, part of the key of the stage that reads it; it checks the columns first, so a setting that names no
column fails the dry run and the run's first seconds, not the stage)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import ArtifactRef, file_sha256, tree_sha256
from pipeline.config import DataConfig

if TYPE_CHECKING:
    from pipeline.data.prompts import BadRow

__all__ = ["DataError", "Table", "READERS", "SETTINGS", "resolve_format", "column_path", "column_map",
           "check_columns", "source_columns", "source_ref"]


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
        ds = datasets.load_dataset(cfg.source, split=cfg.split, revision=cfg.revision)
    except (OSError, ValueError) as exc:  # not found / offline / unknown split: name what was asked for
        raise DataError(f"dataset {cfg.source!r} split {cfg.split!r}: {exc}") from exc
    return Table(ds.to_list(), list(ds.column_names), f"dataset {cfg.source!r} split {cfg.split!r}")


def _local(cfg: DataConfig) -> Path:
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return path


def _read_disk(cfg: DataConfig) -> Table:
    ds, origin = _read_disk_dataset(cfg)
    return Table(ds.to_list(), list(ds.column_names), origin)


def _read_disk_dataset(cfg: DataConfig):
    """(the memory-mapped Dataset of a `save_to_disk` folder, its split chosen; the words that name it)."""
    import datasets

    _local(cfg)
    try:
        ds = datasets.load_from_disk(cfg.source)
    except (OSError, ValueError) as exc:
        raise DataError(f"{cfg.source}: not a datasets `save_to_disk` folder: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"{cfg.source}: no split {cfg.split!r}; available splits: {', '.join(ds)}")
        return ds[cfg.split], f"{cfg.source} split {cfg.split!r}"
    return ds, str(cfg.source)


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
    for rec in _jsonl_records(path):
        records.append(rec)
        columns.update(dict.fromkeys(rec))
    return Table(records, list(columns), str(path))


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per non-blank line; a bad line names the file and the line."""
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
                yield rec
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Column settings
# ---------------------------------------------------------------------------------------------------------

SETTINGS = {"id": "id_column", "prompt": "prompt_column", "solution": "solution_column",
            "answer": "answer_column", "teacher_responses": "teacher_column"}
"""Schema field -> the DataConfig setting that names its column."""
_PATH = re.compile(r"[^.\[\]]+(?:\.[^.\[\]]+|\[-?\d+\])*")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def column_path(spec: str, columns: Sequence[str] = ()) -> list[str | int]:
    """A column setting as keys and list indices: "messages[0].content" -> ["messages", 0, "content"]; a name
    that is itself one of `columns` stays whole (a flat column named "a.b")."""
    if spec in columns:
        return [spec]
    if not _PATH.fullmatch(spec):
        raise DataError(f"column path {spec!r}: expected a column name followed by .key or [index] parts, "
                        f"e.g. 'messages[0].content'")
    return [key if key else int(index) for key, index in _PATH_PART.findall(spec)]


def column_map(cfg: DataConfig, columns: Sequence[str]) -> dict[str, list[str | int] | None]:
    """Schema field -> path into a source row (None: not read). With ids = "content" the id is read from the
    prompt's path (and hashed); with ids = "row" (or id_column None) it is not read."""
    paths = {name: None if getattr(cfg, setting) is None else column_path(getattr(cfg, setting), columns)
             for name, setting in SETTINGS.items()}
    paths["id"] = paths["prompt"] if cfg.ids == "content" else None if cfg.ids == "row" else paths["id"]
    return paths


def check_columns(cfg: DataConfig, columns: Sequence[str], origin: str) -> None:
    """Refuse a source that lacks a column a setting names, listing every one and the available columns; a
    missing id column says how to take ids from the content instead."""
    paths = column_map(cfg, columns)
    missing = [name for name, path in paths.items()
               if path is not None and path[0] not in columns and not (name == "id" and cfg.ids != "column")]
    if not missing:
        return
    names = [f"{paths[n][0]!r} ({_setting_text(cfg, n, paths[n])})" for n in missing]
    hint = (f". The rows have no id column {cfg.id_column!r}: set data.ids = \"content\" (ids from the problem "
            f"text, stable) or data.ids = \"row\" (row numbers), or name the id column in data.id_column"
            if "id" in missing else "")
    raise DataError(f"{origin}: missing column{'s' if len(names) > 1 else ''} {', '.join(names)}; available "
                    f"columns: {', '.join(map(repr, columns)) or 'none'}{hint}")


def _setting_text(cfg: DataConfig, field: str, path: list[str | int]) -> str:
    """How an error names the setting of `field`: "data.answer_column", with its value when it is a path."""
    setting = SETTINGS[field]
    return f"data.{setting}" + ("" if len(path) == 1 else f" = {getattr(cfg, setting)!r}")


def source_columns(cfg: DataConfig) -> list[str] | None:
    """The columns of a local source, read without loading its rows where the format allows (a parquet schema,
    a `save_to_disk` folder's features, the keys of a .jsonl's objects); None for a hub id or another folder."""
    fmt = resolve_format(cfg)
    if fmt == "parquet":
        try:
            return list(pq.read_schema(_local(cfg)).names)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{cfg.source}: cannot read as parquet: {exc}") from exc
    if fmt == "jsonl":
        columns: dict[str, None] = {}
        for rec in _jsonl_records(_local(cfg)):
            columns.update(dict.fromkeys(rec))
        return list(columns)
    if fmt == "disk":
        return list(_read_disk_dataset(cfg)[0].column_names)
    return None


def source_ref(cfg: DataConfig) -> ArtifactRef | None:
    """A reference to a local source with its content digest (file sha256, or tree sha256 of a folder), for the
    cache key of the stage that reads it: editing the file then invalidates the cache. None for "synthetic"
    (its config is the content) and for hub ids (their content is not known before loading). First its columns
    are checked against the settings (`check_columns`) where they can be read without loading the rows."""
    if cfg.source == "synthetic":
        return None
    if resolve_format(cfg) == "hf" and not Path(cfg.source).expanduser().is_dir():
        return None  # a hub id
    columns = source_columns(cfg)
    if columns is not None:
        check_columns(cfg, columns, str(cfg.source))
    path = _local(cfg).resolve()
    sha = tree_sha256(path) if path.is_dir() else file_sha256(path)
    return ArtifactRef(kind="prompt_source", uri=str(path), sha256=sha, schema_version=1)


READERS = {"hf": _read_hub, "disk": _read_disk, "parquet": _read_parquet, "jsonl": _read_jsonl}


