"""Benchmark suites through a run: every checkpoint graded on every benchmark, cached per (model, benchmark,
settings), the paper's per-benchmark table in the summary, each benchmark a dataset in MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline import report, run
from pipeline.config import apply_overrides, load_run_config
from pipeline.data import synthetic
from pipeline.store.outputs import read_output

TINY = Path(__file__).parents[1] / "data" / "tiny_run.toml"
pytestmark = pytest.mark.slow


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Two local benchmarks in two answer formats: GSM8K's "#### x" and MATH's boxed solutions."""
    folder = tmp_path_factory.mktemp("benchmarks")
    problems = synthetic.make_problems(6, seed=99, levels=(1, 2))
    gsm = [{"question": p["prompt"], "answer": f"{p['solution'].splitlines()[0]}\n#### {p['answer']}"}
           for p in problems[:3]]
    boxed = [{"problem": p["prompt"], "solution": p["solution"]} for p in problems[3:]]
    return {"gsm": _jsonl(folder / "gsm.jsonl", gsm), "boxed": _jsonl(folder / "boxed.jsonl", boxed)}


def _benchmarks(sources: dict[str, str], *, boxed: bool) -> list[dict]:
    listed = [{"name": "heldout"},
              {"name": "gsm", "source": sources["gsm"], "prompt_column": "question", "answer_format": "gsm8k", "k": 3}]
    if boxed:
        listed.append({"name": "boxed", "source": sources["boxed"], "prompt_column": "problem",
                       "answer_column": "solution"})
    return listed


def _run(root: Path, benchmarks: list[dict]) -> run.RunResult:
    cfg = apply_overrides(load_run_config(TINY), {"chain": ["sft"], "eval.max_prompts": 2,
                                                 "eval.benchmarks": benchmarks})
    return run.run(cfg, root=root, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sources):
    root = tmp_path_factory.mktemp("bench-run")
    first = _run(root, _benchmarks(sources, boxed=False))
    second = _run(root, _benchmarks(sources, boxed=True))
    return root, first, second


def test_every_checkpoint_is_graded_on_every_benchmark(runs):
    _, first, second = runs
    assert {k for k in first.refs if k.startswith("eval/")} == {"eval/base", "eval/base/gsm", "eval/sft",
                                                                 "eval/sft/gsm"}
    assert {"eval/base/boxed", "eval/sft/boxed"} <= set(second.refs)
    gsm = json.loads((second.refs["eval/sft/gsm"].path / "metrics.json").read_text())
    assert "mean@3" in gsm and "mean@2" not in gsm  # the benchmark's own k
    rows = json.loads((second.refs["benchmark/gsm"].path / "report.json").read_text())
    assert rows["benchmark"] == "gsm"
    assert all(math.isfinite(v) for ref in second.refs.values() if ref.kind == "eval"
               for v in json.loads((ref.path / "metrics.json").read_text()).values())


def test_adding_a_benchmark_computes_only_its_own_cells(runs):
    _, first, second = runs
    assert first.calls.get("prepare_benchmark") == 1 and first.calls.get("evaluate") == 4
    assert second.calls == {"prepare_benchmark": 1, "evaluate": 2, "engine.generate": second.calls["engine.generate"]}
    for label in ("eval/base", "eval/sft", "eval/base/gsm", "eval/sft/gsm"):
        assert second.refs[label] == first.refs[label]


def test_the_summary_shows_each_benchmark_and_their_average(runs):
    root, _, second = runs
    text = second.summary_path.read_text()
    assert "By benchmark (k per benchmark: heldout 2, gsm 3, boxed 2)" in text
    assert "| checkpoint | heldout | gsm | boxed | average |" in text
    assert "no_answer_frac" in text  # why an accuracy is 0 shows beside it
    assert (root / "reports" / "tiny" / "benchmarks.png").is_file()


def test_the_average_is_the_mean_of_the_benchmarks(runs):
    _, _, second = runs
    cfg = apply_overrides(load_run_config(TINY), {"chain": ["sft"], "eval.max_prompts": 2,
                                                 "eval.benchmarks": _benchmarks({"gsm": "/x.jsonl",
                                                                                 "boxed": "/y.jsonl"}, boxed=True)})
    tables = report.benchmark_tables(cfg, second.refs)
    for metric, table in tables.items():
        for checkpoint, row in table.items():
            values = [row[b] for b in ("heldout", "gsm", "boxed")]
            assert row["average"] == pytest.approx(sum(values) / 3), (metric, checkpoint)
    held = json.loads((second.refs["eval/sft"].path / "metrics.json").read_text())
    assert tables["mean@k"]["sft"]["heldout"] == held["mean@2"]


def test_mlflow_records_each_benchmark_as_an_evaluation_dataset_with_its_digest(runs):
    from mlflow import MlflowClient

    from pipeline.tracking import sqlite_uri

    root, _, second = runs
    client = MlflowClient(sqlite_uri(root / "mlflow.db"))
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny"]
    evaluations = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name.startswith("evaluate")]
    seen = {(d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
            for r in evaluations for d in r.inputs.dataset_inputs}
    assert {name for name, _, context in seen if context == "evaluation"} >= {"benchmark/gsm", "benchmark/boxed",
                                                                              "prepare_data/eval"}
    digest = read_output(second.refs["benchmark/gsm"]).file_digest("eval.parquet")[:16]
    assert ("benchmark/gsm", digest, "evaluation") in seen
    parent = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name.startswith("tiny-")][0]
    assert "eval/sft/gsm/mean_at_3" in parent.data.metrics and "eval/sft/average/mean_at_k" in parent.data.metrics


def test_the_summary_shows_each_stages_peak_memory(runs):
    _, first, second = runs
    lines = second.summary_path.read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("Stages (")))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:]]
    header = cells[0]
    assert header[0] == "stage"
    rows = {row[0]: row for row in cells[2:] if len(row) == len(header)}
    assert {"prompts", "teacher", "sft", "eval/base", "eval/sft/boxed", "benchmark/gsm"} <= set(rows)
    peak = header.index("peak_rss_gb")
    assert all(0.05 < float(row[peak]) < 64 for row in rows.values())  # measured, in GB: not bytes, not KiB
