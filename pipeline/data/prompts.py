"""Prompt sets: load (hub dataset, `save_to_disk` folder, .parquet, .jsonl), validate, split.

The schema of one row (a plain dict): id (str), prompt (str), solution (str, the expert solution), answer
(str, the gold final answer), teacher_responses (list[str], possibly empty). Every source goes through the same
column mapping and validation: `load_prompts` reads a file or dataset, `rows_from_records` takes in-memory
dicts (the synthetic task). Validation looks at every row and reports every problem by row id and field, then
either stops (`on_bad_row="error"`) or drops the bad rows and counts why (`"skip"`).

A column setting is a column name or a path into nested fields (`messages[0].content`, `extra_info.index`,
`prompt[-1].content`): the top-level column must exist (checked once, before any row), and a row whose path
leads nowhere is a bad row named by its number, field and path. Row ids come from `id_column`, from the problem
text (`ids = "content"`: "sha-" and 16 hex digits of its sha256) or from the row's position (`ids = "row"`). The
gold answer and the solution can be rewritten from GSM8K's "#### x" form (`answer_format`, `solution_format`).
The prompt becomes `prompt_template` with the problem text in place of "{prompt}", and with `system_prompt` the
row holds both turns (`chat.encode_prompt`), which every stage renders through `chat.render_prompt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.data.chat import encode_prompt
from pipeline.data.sources import (READERS, DataError, Table, check_columns, column_map, column_path, resolve_format,
                                   source_ref)

__all__ = [
    "DataError", "BadRow", "LoadReport", "PromptSet", "PromptSplit", "FIELDS", "column_path", "content_id",
    "PROMPT_SCHEMA", "load_prompts", "rows_from_records", "resolve_format", "split_prompts",
    "write_prompts_parquet", "read_prompts_parquet", "rows_digest", "source_ref",
]

log = logging.getLogger(__name__)

FIELDS = ("id", "prompt", "solution", "answer", "teacher_responses")
PROMPT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("solution", pa.string()),
                           ("answer", pa.string()), ("teacher_responses", pa.list_(pa.string()))])
MAX_LISTED = 100
"""Bad rows spelled out in a DataError message; all of them are in `DataError.bad_rows`."""

GoldCheck = Callable[[str], bool]


@dataclass(frozen=True)
class BadRow:
    """One problem of one row. `index` is the 0-based position in the source; `row_id` None when unknown."""

    index: int
    row_id: str | None
    field: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        who = f"row {self.row_id!r}" if self.row_id is not None else f"row #{self.index}"
        return f"{who} field {self.field!r}: {self.reason}{' ' + self.detail if self.detail else ''}"


@dataclass(frozen=True)
class LoadReport:
    """What loading did: rows read, kept, skipped, and how often each problem occurred ("prompt: empty")."""

    origin: str
    read: int
    kept: int
    skipped: int
    reasons: dict[str, int]
    bad_rows: list[BadRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the counts, the reasons and every bad row as its message line."""
        return {"origin": self.origin, "read": self.read, "kept": self.kept, "skipped": self.skipped,
                "reasons": dict(self.reasons), "bad_rows": [str(b) for b in self.bad_rows]}


@dataclass(frozen=True)
class PromptSet:
    """Validated rows (plain dicts with exactly the keys of FIELDS, in source order) and the load report."""

    rows: list[dict[str, Any]]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class PromptSplit:
    """Train, held-out eval (test) and validation rows, each in source order."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    validation: list[dict[str, Any]] = field(default_factory=list)


class _Bad(ValueError):
    """One field's problem, caught by the row check and turned into a BadRow."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def load_prompts(cfg: DataConfig, *, gold_check: GoldCheck | None = None) -> PromptSet:
    """Read `cfg.source`, map its columns onto the schema and validate every row (see module docstring).
    `gold_check(answer) -> bool` optionally checks that each gold answer parses; False is a bad 'answer'."""
    if cfg.source == "synthetic":
        raise ValueError("source 'synthetic' is generated by pipeline.data.synthetic; pass its rows to "
                         "rows_from_records()")
    table = READERS[resolve_format(cfg)](cfg)
    log.info("read %d rows from %s", len(table.records), table.origin)
    return _validate(table, cfg, gold_check)


def rows_from_records(records: Iterable[Mapping[str, Any]], cfg: DataConfig, *, gold_check: GoldCheck | None = None,
                      origin: str = "records") -> PromptSet:
    """Validate in-memory rows (e.g. the synthetic task's) exactly as a loaded file's rows."""
    records = [dict(r) for r in records]
    columns = list(dict.fromkeys(k for r in records for k in r))
    return _validate(Table(records, columns, origin), cfg, gold_check)


def _validate(table: Table, cfg: DataConfig, gold_check: GoldCheck | None) -> PromptSet:
    if not table.records:
        raise DataError(f"{table.origin}: no rows")
    check_columns(cfg, table.columns, table.origin)
    bad: list[BadRow] = []
    paths = column_map(cfg, table.columns)
    rows = [_check_row(i, rec, paths, cfg, gold_check, bad) for i, rec in enumerate(table.records)]
    bad += _duplicate_ids(rows, same="problem text" if cfg.ids == "content" else None)
    return _finish(table.origin, rows, bad, cfg)


def _lookup(record: Mapping[str, Any], path: list[str | int]) -> Any:
    """The value at `path` in one row; a step that leads nowhere is this row's bad field."""
    value: Any = record
    for depth, part in enumerate(path):
        where = _path_text(path[:depth]) or "the row"
        if isinstance(part, int):
            if not isinstance(value, (list, tuple)):
                raise _Bad("missing", f"({where} is {type(value).__name__}, not a list to take [{part}] from)")
            if not -len(value) <= part < len(value):
                raise _Bad("missing", f"(no [{part}] in {where}, a list of {len(value)})")
        elif not isinstance(value, Mapping) or part not in value:
            known = f"; it has {', '.join(map(repr, list(value)[:10]))}" if isinstance(value, Mapping) else ""
            raise _Bad("missing", f"(no key {part!r} in {where}{known})")
        value = value[part]
    return value


def _path_text(path: Sequence[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def _gsm8k_answer(text: str) -> str:
    """The final answer after GSM8K's last "####", thousands separators removed."""
    answer = text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else ""
    if not answer:
        raise _Bad("no final answer", "(answer_format = 'gsm8k' needs a '#### <answer>' line)")
    return answer


def _gsm8k_solution(text: str) -> str:
    """GSM8K's solution without calculator annotations, its "#### x" line as a boxed final answer."""
    body = re.sub(r"<<[^<>]*>>", "", text.rsplit("####", 1)[0]).rstrip()
    return f"{body}\nThe final answer is \\boxed{{{_gsm8k_answer(text)}}}."


def _text(value: Any, *, int_ok: bool = False) -> str:
    if value is None:
        raise _Bad("missing")
    if int_ok and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Bad("not a string", f"(got {type(value).__name__})")
    if not value.strip():
        raise _Bad("empty")
    return value


def _capped(text: str, cap: int) -> str:
    if len(text) > cap:
        raise _Bad("too long", f"({len(text)} characters > data.max_prompt_chars = {cap})")
    return text


def _teacher(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise _Bad("not a list of strings", f"(got {type(value).__name__})")
    for j, item in enumerate(value):
        if not isinstance(item, str):
            raise _Bad("not a list of strings", f"(item {j} is {type(item).__name__})")
        if not item.strip():
            raise _Bad("empty response", f"(item {j})")
    return list(value)


def _gold(answer: str, gold_check: GoldCheck | None) -> str:
    if gold_check is None:
        return answer
    try:
        ok = gold_check(answer)
    except Exception as exc:  # a check that raises on this answer: report it as this row's problem
        raise _Bad("gold answer check raised", f"{type(exc).__name__}: {exc}") from exc
    if not ok:
        raise _Bad("gold answer does not parse", f"({answer!r})")
    return answer


def _check_row(i: int, rec: Mapping[str, Any], paths: Mapping[str, list[str | int] | None], cfg: DataConfig,
               gold_check: GoldCheck | None, bad: list[BadRow]) -> dict[str, Any]:
    """The row in schema form (None for a bad field); each problem is appended to `bad`."""
    row: dict[str, Any] = {}
    problems: list[tuple[str, _Bad]] = []
    for name, path in paths.items():
        try:
            value = None if path is None else _lookup(rec, path)
            row[name] = _FIELD_CHECKS[name](f"row-{i}" if name == "id" and path is None else value, cfg, gold_check)
        except _Bad as exc:
            row[name] = None
            problems.append((name, exc))
    if cfg.ids == "content":  # an id hashed from a bad prompt: the prompt's own problem says why
        problems = [(name, exc) for name, exc in problems if name != "id" or row["prompt"] is not None]
    bad += [BadRow(i, row["id"], name, exc.reason, exc.detail) for name, exc in problems]
    return row


def content_id(problem: str) -> str:
    """A row id from its problem text: "sha-" and the first 16 hex digits of the text's sha256 (utf-8)."""
    return "sha-" + hashlib.sha256(problem.encode("utf-8")).hexdigest()[:16]


def _prompt(value: Any, cfg: DataConfig) -> str:
    """The templated user turn (with the system turn when set), capped at max_prompt_chars."""
    text = cfg.prompt_template.replace("{prompt}", _text(value))
    return encode_prompt(_capped(text, cfg.max_prompt_chars), cfg.system_prompt)


def _answer(value: Any, cfg: DataConfig, gold_check: GoldCheck | None) -> str:
    text = _text(value, int_ok=True)
    return _gold(_gsm8k_answer(text) if cfg.answer_format == "gsm8k" else text, gold_check)


def _solution(value: Any, cfg: DataConfig) -> str:
    text = _text(value)
    return _gsm8k_solution(text) if cfg.solution_format == "gsm8k" else text


_FIELD_CHECKS: dict[str, Callable[[Any, DataConfig, GoldCheck | None], Any]] = {
    "id": lambda v, cfg, gold: content_id(_text(v)) if cfg.ids == "content" else _text(v, int_ok=True),
    "prompt": lambda v, cfg, gold: _prompt(v, cfg),
    "solution": lambda v, cfg, gold: _solution(v, cfg),
    "answer": _answer,
    "teacher_responses": lambda v, cfg, gold: _teacher(v),
}


def _duplicate_ids(rows: list[dict[str, Any]], same: str | None = None) -> list[BadRow]:
    """Every row whose id an earlier row already has (the first one keeps it); `same` names what they share
    when it is not the id itself (ids from content: the problem text)."""
    first: dict[str, int] = {}
    out = []
    for i, row in enumerate(rows):
        rid = row["id"]
        if rid is None:
            continue
        if rid in first:
            where = f"first at row #{first[rid]}" if same is None else f"same {same} as row #{first[rid]}"
            out.append(BadRow(i, rid, "id", "duplicate", f"({where})"))
        else:
            first[rid] = i
    return out


def _finish(origin: str, rows: list[dict[str, Any]], bad: list[BadRow], cfg: DataConfig) -> PromptSet:
    bad = sorted(bad, key=lambda b: (b.index, FIELDS.index(b.field)))
    reasons = dict(Counter(f"{b.field}: {b.reason}" for b in bad))
    bad_index = {b.index for b in bad}
    if bad and cfg.on_bad_row == "error":
        raise DataError(_bad_rows_message(origin, len(rows), len(bad_index), reasons, bad), bad)
    kept = [r for i, r in enumerate(rows) if i not in bad_index]
    if not kept:
        raise DataError(f"{origin}: all {len(rows)} rows are bad ({_counts(reasons)})", bad)
    if bad:
        log.warning("%s: skipped %d of %d rows (%s)", origin, len(bad_index), len(rows), _counts(reasons))
    report = LoadReport(origin, read=len(rows), kept=len(kept), skipped=len(bad_index), reasons=reasons,
                        bad_rows=bad)
    return PromptSet(kept, report)


def _counts(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in reasons.items())


def _bad_rows_message(origin: str, n_rows: int, n_bad: int, reasons: Mapping[str, int], bad: list[BadRow]) -> str:
    lines = [f"{origin}: {n_bad} of {n_rows} rows are bad ({_counts(reasons)}); fix them or set "
             f"data.on_bad_row = \"skip\":"]
    lines += [f"  {b}" for b in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more (all in DataError.bad_rows)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Split, digest, parquet
# ---------------------------------------------------------------------------------------------------------


def _unit_hash(seed: int, salt: str, row_id: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, salt, id)."""
    digest = hashlib.sha256(f"{seed}\0{salt}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_prompts(rows: Sequence[Mapping[str, Any]], *, eval_fraction: float, seed: int,
                  max_prompts: int | None = None, validation_fraction: float = 0.0) -> PromptSplit:
    """Hold out rows for evaluation (test), then for validation (model selection), by one hash u of (seed, id):
    eval if u < eval_fraction, validation if u < eval_fraction + validation_fraction, else train. A row's side
    never depends on the other rows, so the split is stable when rows are added or reordered, and adding a
    validation share leaves the eval rows as they were. Then keep `max_prompts` train rows, chosen by a seeded
    hash shuffle (also order-free). Every part keeps source order."""
    if not (0 <= eval_fraction < 1 and 0 <= validation_fraction < 1 and eval_fraction + validation_fraction < 1):
        raise ValueError(f"eval_fraction ({eval_fraction}) and validation_fraction ({validation_fraction}) must be "
                         "in [0, 1) with a sum below 1")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1 or None, got {max_prompts}")
    dups = [b.row_id for b in _duplicate_ids([{"id": r["id"]} for r in rows])]
    if dups:
        raise DataError(f"split_prompts: duplicate ids {sorted(set(dups))[:10]}")
    u = [_unit_hash(seed, "eval", r["id"]) for r in rows]
    eval_rows = [dict(r) for r, x in zip(rows, u) if x < eval_fraction]
    validation = [dict(r) for r, x in zip(rows, u) if eval_fraction <= x < eval_fraction + validation_fraction]
    train = [dict(r) for r, x in zip(rows, u) if x >= eval_fraction + validation_fraction]
    if max_prompts is not None and len(train) > max_prompts:
        chosen = set(sorted((r["id"] for r in train), key=lambda rid: _unit_hash(seed, "train", rid))[:max_prompts])
        train = [r for r in train if r["id"] in chosen]
    return PromptSplit(train, eval_rows, validation)


def rows_digest(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the rows' content (canonical JSON of the schema fields, in order): an explicit dataset digest."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r[k] for k in FIELDS], ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_prompts_parquet(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows in the schema to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    for i, r in enumerate(rows):
        missing = [k for k in FIELDS if k not in r]
        if missing:
            raise DataError(f"{path}: row #{i} ({r.get('id')!r}) lacks field(s) {', '.join(missing)}")
    table = pa.Table.from_pylist([{k: r[k] for k in FIELDS} for r in rows], schema=PROMPT_SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        pq.write_table(table, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_prompts_parquet(path: str | Path, *, gold_check: GoldCheck | None = None) -> PromptSet:
    """Read a file written by `write_prompts_parquet`, validated like any other source."""
    cfg = DataConfig(source=str(path), format="parquet", id_column="id", teacher_column="teacher_responses")
    return load_prompts(cfg, gold_check=gold_check)
