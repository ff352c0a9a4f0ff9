"""Real data sets without hand edits: nested column paths, GSM8K's "####" answers, a prompt template and a system
prompt, on a few rows written in the shapes of NuminaMath-CoT, GSM8K and MATH (and the verl layout of the
paper's NuminaMath-CoT distillation); bad mappings fail before any row is used, naming the row, field and path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.config import DataConfig, load_run_config
from pipeline.data import chat
from pipeline.data.prompts import DataError, column_path, content_id, load_prompts, rows_from_records

ROOT = Path(__file__).resolve().parents[2]

# AI-MO/NuminaMath-CoT: source, problem, solution (CoT ending in \boxed{}), messages [user, assistant].
NUMINA = [
    {"source": "synthetic_math", "problem": "What is $2+3$?",
     "solution": "We add: $2+3=5$. The answer is $\\boxed{5}$.",
     "messages": [{"role": "user", "content": "What is $2+3$?"},
                  {"role": "assistant", "content": "We add: $2+3=5$. The answer is $\\boxed{5}$."}]},
    {"source": "olympiads", "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
     "solution": "Common denominator: $\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$.",
     "messages": [{"role": "user", "content": "Compute $\\frac{1}{2}+\\frac{1}{4}$."},
                  {"role": "assistant", "content": "Common denominator: $\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$."}]},
]
# openai/gsm8k (main): question, answer (reasoning with <<calculator>> annotations, then "#### <number>").
GSM8K = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A shop earns $1,200 a day. How much in 2 days?",
     "answer": "It earns 1,200*2 = <<1200*2=2400>>2,400 dollars.\n#### 2,400"},
]
# hendrycks MATH: problem, level, type, solution (with \boxed{} somewhere in it).
MATH = [
    {"problem": "If $x+2=5$, what is $x$?", "level": "Level 1", "type": "Algebra",
     "solution": "Subtracting 2 gives $x=\\boxed{3}$."},
    {"problem": "How many positive divisors does 12 have?", "level": "Level 2", "type": "Number Theory",
     "solution": "They are 1, 2, 3, 4, 6, 12, so there are $\\boxed{6}$ divisors."},
]
# OmniAI-ZJU/NuminaMath-Cot-Distillation-100K (verl layout): prompt as chat messages, nested answer and teachers.
VERL = [
    {"data_source": "numina", "prompt": [{"role": "user", "content": "What is $2+3$?"}],
     "reward_model": {"ground_truth": "5", "style": "rule"},
     "extra_info": {"index": 17, "answer": "2+3=5, so \\boxed{5}.", "model_answer": ["It is \\boxed{5}."] * 2}},
    {"data_source": "numina", "prompt": [{"role": "user", "content": "What is $4 \\cdot 2$?"}],
     "reward_model": {"ground_truth": "8", "style": "rule"},
     "extra_info": {"index": 18, "answer": "4*2=8, so \\boxed{8}.", "model_answer": ["\\boxed{8}"]}},
]


def _rows(records, **settings):
    return rows_from_records(records, DataConfig(**{"id_column": None, **settings})).rows


def _jsonl(tmp_path: Path, records) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_numina_cot_rows_by_column_and_by_message_path():
    flat = _rows(NUMINA, prompt_column="problem", answer_column="solution")
    nested = _rows(NUMINA, prompt_column="messages[0].content", solution_column="messages[-1].content",
                   answer_column="messages[1].content")
    assert flat == nested
    assert [r["prompt"] for r in flat] == [r["problem"] for r in NUMINA]
    assert flat[1]["solution"] == NUMINA[1]["solution"] and flat[1]["answer"] == NUMINA[1]["solution"]
    assert [r["id"] for r in flat] == ["row-0", "row-1"]


def test_gsm8k_rows_take_the_answer_after_the_hashes_and_box_the_solution():
    rows = _rows(GSM8K, prompt_column="question", solution_column="answer", answer_column="answer",
                 answer_format="gsm8k", solution_format="gsm8k")
    assert [r["answer"] for r in rows] == ["72", "2400"]
    assert rows[0]["solution"] == ("In May she sold 48/2 = 24 clips.\nIn total she sold 48+24 = 72 clips.\n"
                                   "The final answer is \\boxed{72}.")
    assert rows[1]["solution"].endswith("The final answer is \\boxed{2400}.")
    raw = _rows(GSM8K, prompt_column="question", solution_column="answer", answer_column="answer")
    assert raw[0]["answer"] == GSM8K[0]["answer"] and "<<48/2=24>>" in raw[0]["solution"]  # text: as it is


def test_gsm8k_answer_without_hashes_is_a_bad_row_named_by_row_and_field():
    broken = [GSM8K[0], {**GSM8K[1], "answer": "It earns 2400 dollars."}]
    with pytest.raises(DataError, match=r"row 'row-1' field 'answer': no final answer .*'#### <answer>'"):
        _rows(broken, prompt_column="question", solution_column="answer", answer_column="answer",
              answer_format="gsm8k")


def test_math_rows_keep_their_solution_as_the_gold_and_pass_the_verifiers_gold_check():
    from pipeline.rollout.verifiers import math_answer

    rows = _rows(MATH, prompt_column="problem", answer_column="solution")
    assert [r["solution"] for r in rows] == [r["solution"] for r in MATH]
    # The math verifier compares with the gold's last \boxed{}: a correct boxed response scores 1, a wrong one 0.
    assert math_answer("so \\boxed{3}", rows[0]) == 1.0 and math_answer("\\boxed{4}", rows[0]) == 0.0
    assert math_answer("\\boxed{6}", rows[1]) == 1.0


def test_verl_layout_of_the_paper_dataset_loads_from_a_file(tmp_path):
    cfg = DataConfig(source=str(_jsonl(tmp_path, VERL)), id_column="extra_info.index",
                     prompt_column="prompt[-1].content", solution_column="extra_info.answer",
                     answer_column="reward_model.ground_truth", teacher_column="extra_info.model_answer")
    rows = load_prompts(cfg).rows
    assert rows[0] == {"id": "17", "prompt": "What is $2+3$?", "solution": "2+3=5, so \\boxed{5}.", "answer": "5",
                       "teacher_responses": ["It is \\boxed{5}."] * 2}
    assert [r["id"] for r in rows] == ["17", "18"]


def test_template_and_system_prompt_reach_the_rendered_chat():
    suffix = "\nPlease reason step by step, and put your final answer within \\boxed{}."
    rows = _rows(MATH, prompt_column="problem", answer_column="solution", prompt_template="{prompt}" + suffix,
                 system_prompt="You are a careful mathematician.")
    turns = chat.prompt_messages(rows[0]["prompt"])
    assert turns == [{"role": "system", "content": "You are a careful mathematician."},
                     {"role": "user", "content": MATH[0]["problem"] + suffix}]

    class Recorder:  # a tokenizer that records what the chat template was given
        def apply_chat_template(self, messages, **kw):
            self.messages = messages
            return [1, 2, 3]

    tok = Recorder()
    assert chat.render_prompt(tok, rows[0]["prompt"]) == [1, 2, 3]
    assert tok.messages == turns  # the one rendering every stage uses: sampling, SFT, teachers, evaluation
    plain = _rows(MATH, prompt_column="problem", answer_column="solution", prompt_template="Q: {prompt}")
    assert plain[0]["prompt"] == "Q: " + MATH[0]["problem"]
    assert chat.prompt_messages(plain[0]["prompt"]) == [{"role": "user", "content": plain[0]["prompt"]}]


def test_prompt_template_needs_the_placeholder_once():
    with pytest.raises(ValueError, match="prompt_template must contain {prompt} exactly once"):
        DataConfig(prompt_template="Solve this.")
    with pytest.raises(ValueError, match="exactly once"):
        DataConfig(prompt_template="{prompt} {prompt}")


def test_a_missing_top_level_column_fails_before_any_row(tmp_path):
    path = _jsonl(tmp_path, NUMINA)
    with pytest.raises(DataError, match=r"missing column 'msgs' \(data.prompt_column = 'msgs\[0\].content'\); "
                                        r"available columns: 'source', 'problem', 'solution', 'messages'"):
        load_prompts(DataConfig(source=str(path), id_column=None, prompt_column="msgs[0].content",
                                answer_column="solution"))


def test_a_path_that_leads_nowhere_names_the_row_the_field_and_the_path():
    short = [NUMINA[0], {**NUMINA[1], "messages": NUMINA[1]["messages"][:1]}]
    with pytest.raises(DataError) as exc:
        _rows(short, prompt_column="problem", solution_column="messages[1].content", answer_column="solution")
    assert "row 'row-1' field 'solution': missing (no [1] in messages, a list of 1)" in str(exc.value)
    with pytest.raises(DataError) as exc:
        _rows(NUMINA, prompt_column="messages[0].text", answer_column="solution")
    assert "row 'row-0' field 'prompt': missing (no key 'text' in messages[0]; it has 'role', 'content')" in str(
        exc.value)
    with pytest.raises(DataError, match=r"row 'row-0' field 'prompt': missing \(source is str, not a list to take \[0\]"):
        _rows(NUMINA, prompt_column="source[0]", answer_column="solution")


def test_column_paths_parse_and_refuse_malformed_ones():
    assert column_path("messages[0].content") == ["messages", 0, "content"]
    assert column_path("prompt[-1].content") == ["prompt", -1, "content"]
    assert column_path("a.b", columns=["a.b"]) == ["a.b"]  # a flat column whose name has a dot stays whole
    for bad in ("a..b", "[0]", "a[x]", "a.", "a[0]b"):
        with pytest.raises(DataError, match="expected a column name followed by"):
            column_path(bad)


def test_paper_config_maps_the_nested_dataset_without_a_flattening_script():
    """The paper config's [data] table as written (its models are hub ids, checked only where they are loaded)."""
    import tomllib

    table = tomllib.loads((ROOT / "configs" / "paper_gpu.toml").read_text())["data"]
    rows = rows_from_records(VERL, DataConfig.model_validate({**table, "on_bad_row": "error"})).rows
    assert rows[1]["id"] == "18" and rows[1]["prompt"] == "What is $4 \\cdot 2$?" and rows[1]["answer"] == "8"
    assert "flatten" not in (ROOT / "configs" / "paper_gpu.toml").read_text().split("[data]")[1].split("[models]")[0]


# ---------------------------------------------------------------------------------------------------------
# Rows without an id column (real GSM8K): ids from the problem text
# ---------------------------------------------------------------------------------------------------------


def _gsm8k(**settings):
    return {"prompt_column": "question", "solution_column": "answer", "answer_column": "answer",
            "answer_format": "gsm8k", "solution_format": "gsm8k", "ids": "content", **settings}


def test_gsm8k_rows_without_ids_take_them_from_the_problem_text():
    rows = rows_from_records(GSM8K, DataConfig(**_gsm8k())).rows
    expected = ["sha-" + hashlib.sha256(r["question"].encode()).hexdigest()[:16] for r in GSM8K]
    assert [r["id"] for r in rows] == expected == [content_id(r["question"]) for r in GSM8K]
    # The same rows reordered, behind a new row, under another template and system prompt: the same ids.
    extra = {"question": "Tom has 3 apples and eats one. How many are left?", "answer": "3-1=2\n#### 2"}
    moved = rows_from_records([extra, *GSM8K[::-1]], DataConfig(**_gsm8k(
        prompt_template="{prompt}\nPut the final answer in \\boxed{}.", system_prompt="Think step by step."))).rows
    assert [r["id"] for r in moved[1:][::-1]] == expected
    assert rows_from_records(GSM8K, DataConfig(**_gsm8k(ids="row"))).rows[1]["id"] == "row-1"


def test_ids_from_content_make_a_repeated_problem_a_duplicate_row():
    twice = [GSM8K[0], GSM8K[1], {**GSM8K[0], "answer": "Another way.\n#### 72"}]
    with pytest.raises(DataError) as exc:
        rows_from_records(twice, DataConfig(**_gsm8k()))
    assert f"row {content_id(GSM8K[0]['question'])!r} field 'id': duplicate (same problem text as row #0)" in str(
        exc.value)
    kept = rows_from_records(twice, DataConfig(**_gsm8k(on_bad_row="skip")))
    assert len(kept.rows) == 2 and kept.report.reasons == {"id: duplicate": 1}
    # A bad problem text is reported once, as the prompt's problem (its id cannot be hashed).
    with pytest.raises(DataError) as exc:
        rows_from_records([GSM8K[0], {**GSM8K[1], "question": "  "}], DataConfig(**_gsm8k()))
    assert "1 of 2 rows are bad (prompt: empty x1)" in str(exc.value)


def test_a_toml_config_says_ids_come_from_the_content(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\nsource = "gsm8k.jsonl"\nprompt_column = "question"\nids = "content"\n')
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    cfg = load_run_config(path)
    assert cfg.data.ids == "content" and cfg.data.id_column == "id"  # the default column is not read
    with pytest.raises(ValueError, match=r"data.ids = 'content' takes ids from the problem text, but "
                                         r"data.id_column = 'uid' names an id column: keep one of the two"):
        DataConfig(ids="content", id_column="uid")
    with pytest.raises(ValueError, match="ids"):
        DataConfig(ids="hash")
