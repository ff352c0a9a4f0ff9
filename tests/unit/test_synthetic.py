"""pipeline/data/synthetic.py: the problems (deterministic, verifiable), the character tokenizer and its chat
template, the tiny models, and a few-step bootstrap that writes loadable Hugging Face folders."""

from __future__ import annotations

import re

import pytest
import torch
from pydantic import ValidationError

from pipeline.data import synthetic
from pipeline.config import SyntheticConfig
from pipeline.data.chat import load_tokenizer
from pipeline.rollout.verifiers import math_answer
from pipeline.data.synthetic import ALPHABET, build_model, build_tokenizer, make_problems, split_problems
from pipeline.rounds import bootstrap as boot
from pipeline.rounds.bootstrap import _score, bootstrap, greedy_accuracy, tokenize_example

ROWS = make_problems(90, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------


def test_same_seed_same_problems_other_seed_other_problems():
    assert make_problems(90, seed=0) == ROWS
    other = make_problems(90, seed=1)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in ROWS]
    assert {r["id"] for r in other}.isdisjoint(r["id"] for r in ROWS)


def test_a_longer_list_extends_a_shorter_one():
    assert make_problems(10, seed=0) == ROWS[:10]


def test_rows_have_the_schema_and_unique_ids():
    assert all(set(r) == {"id", "prompt", "solution", "answer", "level"} for r in ROWS)
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    assert ROWS[7]["id"] == "syn-0-7"


def test_levels_take_turns_and_count_the_steps():
    assert [r["level"] for r in ROWS[:6]] == [1, 2, 3, 1, 2, 3]
    for row in ROWS:
        lines = row["solution"].split("\n")
        assert len(lines) == row["level"] + 1  # one line per step, then the boxed answer
        assert lines[-1] == f"\\boxed{{{row['answer']}}}"
    assert {r["level"] for r in make_problems(12, seed=3, levels=(2, 4))} == {2, 4}


def test_every_step_is_true_arithmetic_on_small_nonnegative_numbers():
    for row in ROWS:
        value = int(re.search(r"has (\d+) ", row["prompt"]).group(1))
        for line in row["solution"].split("\n")[:-1]:
            left, op, operand, result = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", line).groups()
            assert int(left) == value
            value = {"+": int(left) + int(operand), "-": int(left) - int(operand), "*": int(left) * int(operand)}[op]
            assert int(result) == value and 0 <= value <= 99
        assert row["answer"] == str(value)


def test_every_solution_verifies_with_math_answer():
    for row in ROWS:
        assert math_answer(row["solution"], row) == 1.0, row
    assert math_answer(ROWS[0]["solution"].replace("boxed{", "boxed{1"), ROWS[0]) == 0.0


def test_texts_use_only_the_alphabet_and_stay_short():
    for row in ROWS:
        assert set(row["prompt"] + row["solution"]) <= set(ALPHABET)
        assert len(row["prompt"]) + len(row["solution"]) < 200


@pytest.mark.parametrize("kwargs", [{"n": -1, "seed": 0}, {"n": 3, "seed": 0, "levels": ()},
                                    {"n": 3, "seed": 0, "levels": (0,)}])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        make_problems(**kwargs)


def test_dev_and_held_out_rows_are_new_prompts_in_equal_shares_per_level():
    train, dev, held_out = split_problems(SyntheticConfig(n_train=3000, n_dev=30, n_eval=60))
    assert (len(train), len(dev), len(held_out)) == (3000, 30, 60)
    prompts = [{r["prompt"] for r in part} for part in (train, dev, held_out)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    assert len(prompts[2]) == 60
    assert [sum(r["level"] == k for r in held_out) for k in (1, 2, 3)] == [20, 20, 20]
    assert [sum(r["level"] == k for r in dev) for k in (1, 2, 3)] == [10, 10, 10]


def test_no_new_prompt_left_for_held_out_is_an_error(monkeypatch):
    monkeypatch.setattr(synthetic, "make_problems", lambda n, **_: [dict(ROWS[0], id=f"x{i}") for i in range(n)])
    with pytest.raises(ValueError, match="no held-out problems"):
        split_problems(SyntheticConfig(n_train=5, n_eval=2))


def test_config_validates_ranges():
    with pytest.raises(ValidationError):
        SyntheticConfig(levels=(0, 1))
    with pytest.raises(ValidationError):
        SyntheticConfig(n_train=0)
    with pytest.raises(ValidationError, match="base_steps"):
        SyntheticConfig(base_steps=10, teacher_steps=10)  # the base must stop before the teacher
    with pytest.raises(ValidationError):
        SyntheticConfig(steps=3)  # unknown key


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_special_token_ids_and_left_padding(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    batch = tok(["ab", "abcd"], add_special_tokens=False, padding=True).input_ids
    assert batch[0][:2] == [tok.pad_token_id] * 2


def test_one_token_per_character_and_round_trip(tok):
    for row in ROWS:
        for text in (row["prompt"], row["solution"]):
            ids = tok(text, add_special_tokens=False).input_ids
            assert len(ids) == len(text) and tok.unk_token_id not in ids
            assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok("x y").input_ids[0] == tok.bos_token_id
    assert tok("A", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_chat_template_renders_prompt_and_assistant_turn(tok):
    user = [{"role": "user", "content": "ann has 2 pens. how many pens now?"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt == "<bos>q: ann has 2 pens. how many pens now?\na: "
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "\\boxed{2}"}], tokenize=False)
    assert full == prompt + "\\boxed{2}<eos>"
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_example_ids_equal_the_rendered_conversation(tok):
    row = ROWS[2]
    ex = tokenize_example(tok, row)
    conversation = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["solution"]}]
    full = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False).input_ids
    assert list(ex.prompt_ids) + list(ex.response_ids) == full
    assert ex.response_ids[-1] == tok.eos_token_id


def test_tokenizer_survives_save_and_load(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    user = [{"role": "user", "content": ROWS[1]["prompt"]}]
    assert loaded.padding_side == "left"
    assert (loaded.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            == tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False))
    assert loaded(ROWS[1]["solution"]).input_ids == tok(ROWS[1]["solution"]).input_ids


# ---------------------------------------------------------------------------------------------------------
# Models and bootstrap
# ---------------------------------------------------------------------------------------------------------


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_sizes_and_config(tok):
    base, teacher = build_model(tok, size="base", seed=0), build_model(tok, size="teacher", seed=0)
    assert 400_000 <= _params(base) <= 600_000
    assert _params(base) <= _params(teacher) <= 2_000_000
    for model in (base, teacher):
        cfg = model.config
        assert cfg.tie_word_embeddings and cfg.vocab_size == len(tok) and cfg.max_position_embeddings >= 256
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    again = build_model(tok, size="base", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), again.parameters()))


def test_scoring_works_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    row = ROWS[4]
    with ThreadPoolExecutor(1) as pool:  # Prefect runs tasks in worker threads: no signal.alarm there
        scores = list(pool.map(_score, [row["solution"], "9+9=18\n\\boxed{1}", "no answer"], [row] * 3))
    assert scores == [1.0, 0.0, 0.0]


def test_greedy_accuracy_reports_overall_and_per_level(tok):
    model = build_model(tok, size="base", seed=0)
    metrics = greedy_accuracy(model, tok, ROWS[:6], batch_size=4, max_new_tokens=4)
    assert set(metrics) == {"accuracy", "accuracy_level1", "accuracy_level2", "accuracy_level3"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


@pytest.mark.slow
def test_bootstrap_writes_loadable_folders(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = SyntheticConfig(n_train=48, n_dev=6, n_eval=6, teacher_steps=4, base_steps=3, probe_every=2,
                          base_accuracy=1.0, batch_size=8, warmup_steps=1)
    result = bootstrap(tmp_path / "boot", cfg)
    assert (result.teacher_dir, result.base_dir) == (tmp_path / "boot" / "teacher", tmp_path / "boot" / "base")
    text = ROWS[2]["solution"]
    for folder in (result.teacher_dir, result.base_dir):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert AutoTokenizer.from_pretrained(folder).chat_template  # loads, but see load_tokenizer
        tokenizer = load_tokenizer(folder)  # transformers 5 maps a qwen2 folder to Qwen2Tokenizer (drops spaces)
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
        assert model.config.eos_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "left"
    assert result.metrics["teacher/params"] == result.metrics["base/params"]  # one run, two stops
    # probes at steps 2 and 3 (base_steps) miss the target: the base is the run at step 3 of 4
    assert (result.metrics["base/steps"], result.metrics["teacher/steps"]) == (3.0, 4.0)
    assert 0.0 <= result.metrics["base/dev_accuracy"] < 1.0
    for who in ("teacher", "base"):
        assert 0.0 <= result.metrics[f"{who}/accuracy"] <= 1.0
        assert {f"{who}/accuracy_level{k}" for k in (1, 2, 3)} <= set(result.metrics)
    assert result.metrics["wall_seconds"] > 0


def test_base_is_the_first_probe_that_reaches_the_target(tok, monkeypatch):
    accuracies = iter([0.1, 0.35, 0.9])
    monkeypatch.setattr(boot, "greedy_accuracy", lambda *a, **k: {"accuracy": next(accuracies)})
    model = build_model(tok, size="base", seed=0)
    pick = boot._BasePick()
    on_step = boot._base_picker(model, tok, ROWS[:3], SyntheticConfig(probe_every=10, base_accuracy=0.3), pick)
    for step in range(1, 40):
        on_step(step, {})
    assert (pick.step, pick.dev_accuracy) == (20, 0.35)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # training goes on; the copy stays as it was at step 20
    assert not torch.equal(pick.model.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_probing_does_not_change_the_training_run(tok):
    from pipeline.model.scoring import sft_objective
    from pipeline.model.loop import fit

    cfg = SyntheticConfig(teacher_steps=3, base_steps=2, probe_every=1, base_accuracy=1.0, warmup_steps=0)
    examples = [tokenize_example(tok, row) for row in ROWS[:24]]
    models = []
    for probe in (False, True):
        model, pick = build_model(tok, size="base", seed=0), boot._BasePick()
        on_step = boot._base_picker(model, tok, ROWS[24:27], cfg, pick) if probe else None
        fit(model, examples, sft_objective(), boot._train_config(cfg.model_copy(update={"batch_size": 4})),
            pad_id=tok.pad_token_id, on_step=on_step, progress_bar=False)
        models.append(model)
    assert pick.step == 2
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
