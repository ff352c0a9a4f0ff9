"""pipeline/data/prompts.py: every source loads the same rows; every bad row is reported by id and field; the split is
a pure function of (seed, id); prompts and responses are tokenized as an engine would."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import prompts as data
from pipeline.config import DataConfig
from pipeline.data import chat
from pipeline.data.chat import render_prompt, render_response
from pipeline.data.prompts import (DataError, load_prompts, read_prompts_parquet, resolve_format, rows_digest,
                                   rows_from_records, split_prompts, write_prompts_parquet)

ROWS = [
    {"id": f"p{i}", "prompt": f"What is {i}+{i}?", "solution": f"{i}+{i}={2 * i}. \\boxed{{{2 * i}}}",
     "answer": str(2 * i), "teacher_responses": [f"It is \\boxed{{{2 * i}}}"] * (i % 3)}
    for i in range(6)
]
CFG = dict(id_column="id", teacher_column="teacher_responses")


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache of the folder loader inside the test's tmp dir."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(source, **kw) -> data.PromptSet:
    return load_prompts(DataConfig(source=str(source), **{**CFG, **kw}))


def messages(exc_info) -> list[str]:
    return [line.strip() for line in str(exc_info.value).splitlines()[1:]]


# ---------------------------------------------------------------------------------------------------------
# Sources and column mapping
# ---------------------------------------------------------------------------------------------------------


def test_every_source_format_loads_the_same_rows(tmp_path, monkeypatch):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "folder").mkdir()
    write_parquet(tmp_path / "folder" / "train.parquet", ROWS)  # a script-free folder: datasets' folder loader
    sources = {
        "jsonl": write_jsonl(tmp_path / "p.jsonl", ROWS), "parquet": write_parquet(tmp_path / "p.parquet", ROWS),
        "disk": tmp_path / "disk", "dict": tmp_path / "dict", "folder": tmp_path / "folder",
    }
    formats = {name: resolve_format(DataConfig(source=str(src))) for name, src in sources.items()}
    assert formats == {"jsonl": "jsonl", "parquet": "parquet", "disk": "disk", "dict": "disk", "folder": "hf"}
    for name, src in sources.items():
        assert load(src).rows == ROWS, name
    # A hub id goes through the real `datasets.load_dataset(id, split=...)` call.
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or ds)
    assert load("someone/math-prompts", split="train").rows == ROWS
    assert calls == [(("someone/math-prompts",), {"split": "train", "revision": None})]


def test_disk_dataset_dict_picks_the_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list(ROWS[:2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load(tmp_path / "dict", split="test").rows == ROWS[:2]
    with pytest.raises(DataError, match=r"no split 'validation'; available splits: train, test"):
        load(tmp_path / "dict", split="validation")


def test_hub_errors_name_the_dataset_and_split():
    with pytest.raises(DataError, match=r"dataset 'nobody/nothing-here' split 'train'"):
        load("nobody/nothing-here")


def test_column_mapping_and_numbered_ids(tmp_path):
    renamed = [{"question": r["prompt"], "worked": r["solution"], "gold": int(r["answer"]), "uid": i}
               for i, r in enumerate(ROWS)]
    path = write_parquet(tmp_path / "r.parquet", renamed)
    cfg = dict(prompt_column="question", solution_column="worked", answer_column="gold")
    rows = load_prompts(DataConfig(source=str(path), id_column=None, **cfg)).rows
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(len(ROWS))]
    assert [r["answer"] for r in rows] == [r["answer"] for r in ROWS]  # integer gold answers become strings
    assert all(r["teacher_responses"] == [] for r in rows)
    assert list(rows[0]) == list(data.FIELDS)
    rows = load_prompts(DataConfig(source=str(path), id_column="uid", **cfg)).rows
    assert [r["id"] for r in rows] == [str(i) for i in range(len(ROWS))]


def test_missing_columns_name_the_file_and_list_the_available_ones(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{k: v for k, v in r.items() if k != "solution"} for r in ROWS])
    with pytest.raises(DataError) as exc:
        load(path, answer_column="gold")
    msg = str(exc.value)
    assert str(path) in msg
    assert "missing columns 'solution' (data.solution_column), 'gold' (data.answer_column)" in msg
    assert "available columns: 'id', 'prompt', 'answer', 'teacher_responses'" in msg


@pytest.mark.parametrize("source, match", [
    ("/nowhere/p.parquet", "no such file"), ("./p.jsonl", "no such file"), ("~/nowhere", "no such file"),
    ("synthetic", "rows_from_records")])
def test_unreadable_sources(source, match):
    with pytest.raises(ValueError, match=match):
        load_prompts(DataConfig(source=source))


def test_an_explicit_format_with_a_missing_file(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'p.x'}: no such file"):
        load(tmp_path / "p.x", format="jsonl")


def test_corrupt_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n\n{oops\n")
    with pytest.raises(DataError, match=rf"{bad} line 3: invalid JSON"):
        load(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        load(bad)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read as parquet"):
        load(tmp_path / "bad.parquet")
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(DataError, match="set data.format"):
        load(tmp_path / "rows.txt")


# ---------------------------------------------------------------------------------------------------------
# Bad rows
# ---------------------------------------------------------------------------------------------------------

def _bad_rows() -> tuple[list[dict], list[str]]:
    """Good rows interleaved with one row per kind of problem, and the message line each must produce."""
    good = [dict(r) for r in ROWS]
    bad = [
        ({**good[0], "id": "e1", "prompt": "  "}, "row 'e1' field 'prompt': empty"),
        ({**good[0], "id": "e2", "prompt": 7}, "row 'e2' field 'prompt': not a string (got int)"),
        ({**good[0], "id": "e3", "solution": ""}, "row 'e3' field 'solution': empty"),
        ({**good[0], "id": "e4", "answer": None}, "row 'e4' field 'answer': missing"),
        ({**good[0], "id": "e5", "answer": ""}, "row 'e5' field 'answer': empty"),
        ({**good[1]}, "row 'p1' field 'id': duplicate (first at row #1)"),
        ({**good[0], "id": "e6", "teacher_responses": "just one"},
         "row 'e6' field 'teacher_responses': not a list of strings (got str)"),
        ({**good[0], "id": "e7", "teacher_responses": ["ok", 3]},
         "row 'e7' field 'teacher_responses': not a list of strings (item 1 is int)"),
        ({**good[0], "id": "e8", "answer": "??"}, "row 'e8' field 'answer': gold answer does not parse ('??')"),
        ({**good[0], "id": None, "prompt": ""}, None),  # two problems in one row, no id: named by position
    ]
    rows = good + [r for r, _ in bad]
    n = len(good) + len(bad) - 1
    expected = [m for _, m in bad if m] + [f"row #{n} field 'id': missing", f"row #{n} field 'prompt': empty"]
    return rows, expected


def gold_check(answer: str) -> bool:
    return answer != "??"


def test_every_bad_row_is_listed_by_id_and_field(tmp_path):
    rows, expected = _bad_rows()
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as exc:
        load_prompts(DataConfig(source=str(path), **CFG), gold_check=gold_check)
    first = str(exc.value).splitlines()[0]
    assert first.startswith(f"{path}: 10 of {len(rows)} rows are bad") and "prompt: empty x2" in first
    assert messages(exc) == expected
    assert [str(b) for b in exc.value.bad_rows] == expected


def test_skip_mode_counts_the_reasons(tmp_path):
    rows, _ = _bad_rows()
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    got = load_prompts(DataConfig(source=str(path), on_bad_row="skip", **CFG), gold_check=gold_check)
    assert got.rows == ROWS
    r = got.report
    assert (r.read, r.kept, r.skipped) == (len(rows), len(ROWS), 10)
    assert r.reasons == {"prompt: empty": 2, "prompt: not a string": 1, "solution: empty": 1, "answer: missing": 1,
                         "answer: empty": 1, "id: duplicate": 1, "teacher_responses: not a list of strings": 2,
                         "answer: gold answer does not parse": 1, "id: missing": 1}


def test_a_raising_gold_check_is_a_bad_answer():
    def check(answer: str) -> bool:
        raise ValueError(f"cannot parse {answer}")

    with pytest.raises(DataError, match=r"row 'p0' field 'answer': gold answer check raised ValueError: cannot"):
        rows_from_records(ROWS, DataConfig(**CFG), gold_check=check)


def test_all_rows_bad_or_no_rows_is_an_error():
    with pytest.raises(DataError, match="all 1 rows are bad"):
        rows_from_records([{**ROWS[0], "prompt": ""}], DataConfig(on_bad_row="skip", **CFG))
    with pytest.raises(DataError, match="records: no rows"):
        rows_from_records([], DataConfig(**CFG))


def test_long_lists_are_capped_in_the_message_but_kept_whole():
    rows = [{**r, "id": f"x{i}", "prompt": ""} for i, r in enumerate(ROWS * 30)]
    with pytest.raises(DataError) as exc:
        rows_from_records(rows, DataConfig(**CFG), origin="synthetic")
    assert len(exc.value.bad_rows) == 180
    assert "... and 80 more (all in DataError.bad_rows)" in str(exc.value)


def test_in_memory_records_go_through_the_same_validation():
    got = rows_from_records(ROWS, DataConfig(**CFG), origin="synthetic")
    assert got.rows == ROWS and got.report.origin == "synthetic" and got.report.skipped == 0
    with pytest.raises(DataError, match="synthetic: missing column 'question'"):
        rows_from_records(ROWS, DataConfig(prompt_column="question"), origin="synthetic")


# ---------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------

MANY = [{**ROWS[0], "id": f"q{i}"} for i in range(400)]


def ids(rows) -> list[str]:
    return [r["id"] for r in rows]


def test_split_is_deterministic_disjoint_and_complete():
    a = split_prompts(MANY, eval_fraction=0.25, seed=1)
    b = split_prompts(MANY, eval_fraction=0.25, seed=1)
    assert a == b
    assert not set(ids(a.train)) & set(ids(a.eval))
    assert sorted(ids(a.train) + ids(a.eval)) == sorted(ids(MANY))
    assert 60 < len(a.eval) < 140
    assert set(ids(split_prompts(MANY, eval_fraction=0.25, seed=2).eval)) != set(ids(a.eval))
    assert split_prompts(MANY, eval_fraction=0.0, seed=1).eval == []


def test_split_is_stable_under_reordering_and_additions():
    base = split_prompts(MANY, eval_fraction=0.2, seed=0)
    shuffled = MANY[:]
    random.Random(5).shuffle(shuffled)
    again = split_prompts(shuffled, eval_fraction=0.2, seed=0)
    assert set(ids(again.eval)) == set(ids(base.eval)) and set(ids(again.train)) == set(ids(base.train))
    more = MANY + [{**ROWS[0], "id": f"new{i}"} for i in range(50)]
    grown = split_prompts(more, eval_fraction=0.2, seed=0)
    assert set(ids(base.eval)) <= set(ids(grown.eval)) and set(ids(base.train)) <= set(ids(grown.train))


def test_max_prompts_takes_a_seeded_order_free_sample_of_train():
    full = split_prompts(MANY, eval_fraction=0.2, seed=0)
    capped = split_prompts(MANY, eval_fraction=0.2, seed=0, max_prompts=50)
    assert capped.eval == full.eval and len(capped.train) == 50
    assert set(ids(capped.train)) <= set(ids(full.train))
    assert ids(capped.train) != ids(full.train)[:50]  # a shuffle, not the head of the file
    assert ids(capped.train) == sorted(ids(capped.train), key=ids(MANY).index)  # source order kept
    shuffled = MANY[::-1]
    assert set(ids(split_prompts(shuffled, eval_fraction=0.2, seed=0, max_prompts=50).train)) == set(ids(capped.train))
    assert set(ids(split_prompts(MANY, eval_fraction=0.2, seed=1, max_prompts=50).train)) != set(ids(capped.train))


def test_validation_split_is_disjoint_and_leaves_the_eval_rows_alone():
    plain = split_prompts(MANY, eval_fraction=0.2, seed=0)
    three = split_prompts(MANY, eval_fraction=0.2, seed=0, validation_fraction=0.15)
    train, test, val = set(ids(three.train)), set(ids(three.eval)), set(ids(three.validation))
    assert not (train & test) and not (train & val) and not (test & val)
    assert train | test | val == set(ids(MANY))
    assert three.eval == plain.eval  # adding a validation share never moves a test row
    assert val <= set(ids(plain.train)) and 30 < len(val) < 90  # taken from what was training
    assert ids(three.validation) == sorted(ids(three.validation), key=ids(MANY).index)  # source order kept
    shuffled = MANY[::-1]
    assert set(ids(split_prompts(shuffled, eval_fraction=0.2, seed=0, validation_fraction=0.15).validation)) == val
    capped = split_prompts(MANY, eval_fraction=0.2, seed=0, validation_fraction=0.15, max_prompts=20)
    assert capped.validation == three.validation and len(capped.train) == 20  # the cap is on training rows only
    assert plain.validation == []
    with pytest.raises(ValueError, match="validation_fraction"):
        split_prompts(MANY, eval_fraction=0.5, seed=0, validation_fraction=0.5)


def test_run_config_checks_the_validation_settings():
    from pipeline.config import RunConfig

    with pytest.raises(ValueError, match="eval.validation = true.*validation_fraction = 0"):
        RunConfig.model_validate({"eval": {"validation": True}})
    with pytest.raises(ValueError, match="leaves no training prompts"):
        RunConfig.model_validate({"data": {"eval_fraction": 0.5, "validation_fraction": 0.5}})
    cfg = RunConfig.model_validate({"data": {"validation_fraction": 0.1}, "eval": {"validation": True}})
    assert cfg.eval.validation and cfg.data.validation_fraction == 0.1


def test_split_rejects_duplicates_and_bad_fractions():
    with pytest.raises(DataError, match="duplicate ids"):
        split_prompts(ROWS + ROWS[:1], eval_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_prompts(ROWS, eval_fraction=1.0, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Parquet output and digests
# ---------------------------------------------------------------------------------------------------------


def test_write_prompts_parquet_round_trip_and_atomicity(tmp_path, monkeypatch):
    path = write_prompts_parquet(ROWS, tmp_path / "prompts.parquet")
    assert pq.read_schema(path).equals(data.PROMPT_SCHEMA, check_metadata=False)
    assert read_prompts_parquet(path).rows == ROWS

    def crash(table, where, **kw):
        Path(where).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(data.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        write_prompts_parquet(ROWS[:2], path)
    monkeypatch.undo()
    assert read_prompts_parquet(path).rows == ROWS  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.parquet"]
    with pytest.raises(DataError, match=r"row #0 \('p0'\) lacks field\(s\) answer"):
        write_prompts_parquet([{k: v for k, v in ROWS[0].items() if k != "answer"}], path)


def test_rows_digest_follows_content():
    assert rows_digest(ROWS) == rows_digest([dict(r) for r in ROWS])
    assert rows_digest(ROWS) != rows_digest(ROWS[::-1])
    assert rows_digest(ROWS) != rows_digest([{**ROWS[0], "answer": "1"}] + ROWS[1:])


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789 :\n+=?.{}\\":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    template = ("{% for m in messages %}{% if m['role']=='user' %}<bos>q: {{ m['content'] }}\n{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}a: {% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=template)


def test_render_prompt_applies_the_chat_template(tokenizer):
    ids = render_prompt(tokenizer, "1+1?")
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids == [2] + tokenizer("q: 1+1?\na: ", add_special_tokens=False)["input_ids"]
    assert "".join(tokenizer.convert_ids_to_tokens(ids)) == "<bos>q: 1+1?\na: "


def test_render_prompt_accepts_both_return_types(tokenizer, monkeypatch):
    plain = render_prompt(tokenizer, "2+2")
    as_list = lambda *a, **kw: list(plain)  # noqa: E731 - transformers 4.x returns a plain list
    monkeypatch.setattr(tokenizer, "apply_chat_template", as_list)
    assert render_prompt(tokenizer, "2+2") == plain


def test_render_response_appends_eos_and_reports_truncation(tokenizer):
    text = "so 2+2=4"
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = render_response(tokenizer, text, max_tokens=100)
    assert full.ids == body + [tokenizer.eos_token_id] and not full.truncated
    exact = render_response(tokenizer, text, max_tokens=len(body) + 1)
    assert exact.ids == full.ids and not exact.truncated
    cut = render_response(tokenizer, text, max_tokens=4)
    assert cut.ids == body[:4] and cut.truncated
    with pytest.raises(ValueError, match="max_tokens"):
        render_response(tokenizer, text, max_tokens=0)


def test_report_to_dict_is_json_ready(tmp_path):
    rows, expected = _bad_rows()
    got = rows_from_records(rows, DataConfig(on_bad_row="skip", **CFG), gold_check=gold_check)
    d = json.loads(json.dumps(got.report.to_dict()))
    assert (d["read"], d["kept"], d["skipped"]) == (len(rows), len(ROWS), 10)
    assert d["bad_rows"] == expected and d["reasons"]["prompt: empty"] == 2


def test_source_ref_follows_local_content(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    ref = data.source_ref(DataConfig(source=str(path)))
    assert ref.uri == str(path) and ref.kind == "prompt_source"
    write_jsonl(path, ROWS[:-1])
    assert data.source_ref(DataConfig(source=str(path))).sha256 != ref.sha256
    (tmp_path / "folder").mkdir()
    write_parquet(tmp_path / "folder" / "train.parquet", ROWS)
    assert data.source_ref(DataConfig(source=str(tmp_path / "folder"))) is not None
    assert data.source_ref(DataConfig(source="someone/math-prompts")) is None
    assert data.source_ref(DataConfig()) is None  # synthetic


def test_load_tokenizer_keeps_a_custom_tokenizer_exact(tmp_path):
    # A Qwen2 folder with the embedded default's character tokenizer: AutoTokenizer would load the family's
    # Qwen2Tokenizer and drop spaces and newlines; load_tokenizer keeps tokenizer.json as saved.
    from pipeline.data import synthetic

    tok = synthetic.build_tokenizer()
    synthetic.build_model(tok, size="base", seed=0).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    text = "ann has 3 pens.\nshe gets 2. how many?"
    loaded = chat.load_tokenizer(tmp_path)
    assert loaded(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    assert loaded.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert chat.render_prompt(loaded, text) == chat.render_prompt(tok, text)


def test_a_source_without_its_id_column_is_refused_by_its_content_reference(tmp_path):
    """The default id_column = "id" on rows without one (real GSM8K): the error names the setting and the fix
    where the source's content reference is taken (the dry run's plan, the run's first call), not in the
    prepare_data stage; the columns of a parquet file come from its schema, not its rows."""
    for path in _sources_without_ids(tmp_path):
        with pytest.raises(DataError) as exc:
            data.source_ref(DataConfig(source=str(path)))
        assert (f"{path}: missing column 'id' (data.id_column); available columns: 'prompt', 'solution', 'answer', "
                f"'teacher_responses'. The rows have no id column 'id': set data.ids = \"content\"") in str(exc.value)
        assert data.source_ref(DataConfig(source=str(path), ids="content")).uri == str(path)
    with pytest.raises(DataError, match=r"missing column 'problem' \(data.prompt_column\); available"):
        data.source_ref(DataConfig(source=str(tmp_path / "p.jsonl"), ids="content", prompt_column="problem"))


def test_the_dry_run_plan_refuses_a_source_without_its_id_column(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.run import plan

    for path in _sources_without_ids(tmp_path):
        with pytest.raises(DataError, match=r"missing column 'id' \(data.id_column\).*data.ids = \"content\""):
            plan(RunConfig(data=DataConfig(source=str(path))), tmp_path / "root")


def _sources_without_ids(tmp_path: Path) -> list[Path]:
    no_ids = [{k: v for k, v in r.items() if k != "id"} for r in ROWS]
    return [write_jsonl(tmp_path / "p.jsonl", no_ids), write_parquet(tmp_path / "p.parquet", no_ids)]
