"""Benchmark suites in the settings: the schema, the per-benchmark evaluation settings, path resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import HELDOUT, BenchmarkConfig, DataConfig, EvalConfig, RunConfig, load_run_config


def test_no_benchmark_listed_grades_the_held_out_split_with_the_eval_table_unchanged():
    cfg = EvalConfig(k=3)
    (only,) = cfg.suite()
    assert only.name == only.source == HELDOUT
    assert cfg.for_benchmark(only) == cfg  # the held-out evaluation's settings (and so its key) as before


def test_a_benchmark_takes_its_own_k_sampling_cap_and_verifier_and_drops_the_list():
    gsm = BenchmarkConfig(name="gsm8k", source="gsm.jsonl", k=8, max_prompts=5, reward="exact_match",
                          sampling={"temperature": 0.7, "max_new_tokens": 32})
    cfg = EvalConfig(k=2, validation=True, benchmarks=[{"name": HELDOUT}, gsm])
    own = cfg.for_benchmark(gsm)
    assert (own.k, own.max_prompts, own.reward, own.sampling.temperature) == (8, 5, "exact_match", 0.7)
    assert own.benchmarks == () and own.validation is False  # validation prompts go with the held-out split only
    held = cfg.for_benchmark(cfg.benchmarks[0])
    assert held == EvalConfig(k=2, validation=True)  # adding gsm8k leaves the held-out evaluation's key alone


@pytest.mark.parametrize("bad,message", [
    ([{"name": "a", "source": "x.jsonl"}, {"name": "a", "source": "y.jsonl"}], "unique"),
    ([{"name": "gsm8k"}], "held-out split"),
    ([{"name": HELDOUT, "source": "x.jsonl"}], "held-out split"),
    ([{"name": "bad name", "source": "x.jsonl"}], "name"),
    ([{"name": "a", "source": "x.jsonl", "prompt_template": "no slot"}], "{prompt}"),
])
def test_bad_benchmark_lists_are_refused_naming_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(benchmarks=bad)


def test_validation_needs_the_held_out_split_among_the_benchmarks():
    with pytest.raises(ValueError, match='add { name = "heldout" }'):
        EvalConfig(validation=True, benchmarks=[{"name": "a", "source": "x.jsonl"}])


def test_eval_fraction_zero_is_allowed_only_when_no_benchmark_is_the_held_out_split():
    with pytest.raises(ValueError, match="eval_fraction = 0"):
        RunConfig(data={"eval_fraction": 0.0})
    RunConfig(data={"eval_fraction": 0.0}, eval={"benchmarks": [{"name": "a", "source": "x.jsonl"}]})


def test_a_benchmark_reads_with_its_own_columns_and_the_runs_template():
    data = DataConfig(prompt_template="Q: {prompt}", system_prompt="Be brief.", eval_fraction=0.3, seed=7)
    bench = BenchmarkConfig(name="gsm8k", source="t.jsonl", prompt_column="question", answer_format="gsm8k")
    read = bench.data_config(data)
    assert (read.source, read.prompt_column, read.answer_format, read.solution_format) == \
        ("t.jsonl", "question", "gsm8k", "gsm8k")
    assert (read.prompt_template, read.system_prompt) == ("Q: {prompt}", "Be brief.")
    assert (read.eval_fraction, read.seed) == (DataConfig().eval_fraction, 0)  # the split is not the benchmark's
    own = bench.model_copy(update={"prompt_template": "{prompt} Box it.", "system_prompt": ""}).data_config(data)
    assert (own.prompt_template, own.system_prompt) == ("{prompt} Box it.", "")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_benchmark_sources_resolve_against_the_config_folder_and_a_missing_one_is_named(tmp_path):
    _write(tmp_path / "gsm.jsonl", json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    config = _write(tmp_path / "run.toml", '[[eval.benchmarks]]\nname = "heldout"\n\n'
                    '[[eval.benchmarks]]\nname = "gsm8k"\nsource = "gsm.jsonl"\n\n'
                    '[[eval.benchmarks]]\nname = "hub"\nsource = "org/name"\nrevision = "abc"\n')
    cfg = load_run_config(config)
    assert [b.source for b in cfg.eval.benchmarks] == [HELDOUT, str((tmp_path / "gsm.jsonl").resolve()), "org/name"]
    missing = _write(tmp_path / "missing.toml", '[[eval.benchmarks]]\nname = "gsm8k"\nsource = "./nope.jsonl"\n')
    with pytest.raises(ValueError, match=r"eval.benchmarks\[0\] \(gsm8k\).source = './nope.jsonl'"):
        load_run_config(missing)


def test_a_benchmarks_reward_module_must_be_allowed():
    with pytest.raises(ValueError, match=r"eval.benchmarks\[0\].reward"):
        RunConfig(eval={"benchmarks": [{"name": "a", "source": "x.jsonl", "reward": "evil.mod:f"}]})


ROOT = Path(__file__).parents[2]


def test_the_paper_recipe_grades_the_six_paper_benchmarks_like_the_paper():
    from pipeline.config import RunConfig, load_toml

    cfg = load_toml(RunConfig, ROOT / "configs" / "paper_gpu.toml")
    names = [b.name for b in cfg.eval.suite()]
    assert names == [HELDOUT, "amc23", "college_math", "gaokao2023en", "math", "minerva_math", "tabmwp"]
    for bench in cfg.eval.benchmarks[1:]:
        own = cfg.eval.for_benchmark(bench)
        assert (own.k, own.sampling.temperature) == (16, 0.5)  # "Pass@16 Average" at temperature 0.5
        assert "/" in bench.source and "\\boxed{}" in bench.prompt_template  # a hub id; the boxed instruction


def test_the_benchmarks_config_grades_real_gsm8k_and_a_boxed_file_beside_the_held_out_split():
    cfg = load_run_config(ROOT / "configs" / "benchmarks.toml")
    default = load_run_config(ROOT / "configs" / "default.toml")
    assert [b.name for b in cfg.eval.suite()] == [HELDOUT, "gsm8k", "arith_boxed"]
    assert all(Path(b.source).is_file() for b in cfg.eval.benchmarks[1:])
    # the same stages as the default: a run after `make run` computes only the new evaluations
    assert cfg.model_copy(update={"name": default.name, "eval": default.eval}).key_digest() == default.key_digest()


def test_the_summary_shows_each_checkpoints_no_answer_fraction(tmp_path):
    """A 0 accuracy says why beside it: the base of a real chat model gave no parseable answer at all."""
    from pipeline import report
    from pipeline.tracking import NullTracker

    metrics = {"base": {"greedy_accuracy": 0.0, "mean@4": 0.0, "pass@4": 0.0, "no_answer_frac": 1.0},
               "sft": {"greedy_accuracy": 0.5, "mean@4": 0.25, "pass@4": 0.5, "no_answer_frac": 0.125}}
    path = report.write_summary(tmp_path / "summary.md", RunConfig(), {}, metrics, [], NullTracker(), None)
    lines = path.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| checkpoint"))
    column = header.split(" | ").index("no_answer_frac")
    assert [line.split(" | ")[column] for line in lines if line.startswith(("| base", "| sft"))] == ["1.0000", "0.1250"]
