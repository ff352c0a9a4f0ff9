"""The run's report: the summary table, its plots, and the chain stages' outputs they are drawn from.

`finish` in `pipeline.run` calls `write_plots` and `write_summary` once the DAG is done; the experiment report reads
chain stages through `chain_outputs`. A cached rerun draws nothing: plots drawn from the same outputs by the same
plotting code are kept.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

from pipeline import plots
from pipeline.atomic import write_text_atomic
from pipeline.config import HELDOUT, RunConfig
from pipeline.store.artifacts import ArtifactRef
from pipeline.store.outputs import Chain, find_output, read_chain, read_output

__all__ = ["write_plots", "write_summary", "chain_outputs", "chain_stage", "stage_history", "round_metrics",
           "primary_benchmark", "eval_label", "benchmark_tables", "stage_resources"]

TABLE_COLUMNS = ["greedy_accuracy", "mean@{k}", "pass@{k}", "no_answer_frac", "entropy", "kl_base_policy",
                 "distinct_answers"]
BENCHMARK_METRICS = ("greedy_accuracy", "mean@{k}", "pass@{k}", "no_answer_frac")
"""The per-benchmark tables of the summary, one per metric (k: each benchmark's own)."""


def write_plots(cfg: RunConfig, refs: dict[str, ArtifactRef], metrics: dict[str, dict[str, float]],
                out: Path) -> list[Path]:
    """accuracy.png, training.png (loss, grad norm, entropy, rectified fraction per step), rewards.png. Plots drawn
    from the same outputs by the same plotting code are kept (`.plots.json` records their key): a cached rerun
    draws nothing, which was 2 s of matplotlib."""
    stamp, key = out / ".plots.json", _plots_key(cfg, refs)
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        saved = {}
    kept = [out / name for name in saved.get("plots", [])]
    if saved.get("key") == key and kept and all(p.is_file() for p in kept):
        return kept
    paths = _draw_plots(cfg, refs, metrics, out)
    write_text_atomic(stamp, json.dumps({"key": key, "plots": [p.name for p in paths]}))
    return paths


def _draw_plots(cfg: RunConfig, refs: dict[str, ArtifactRef], metrics: dict[str, dict[str, float]],
                out: Path) -> list[Path]:
    histories = {name: stage_history(refs, name) for name in cfg.chain}
    rounds = {name: round_metrics(refs, name) for name in cfg.chain if name != "sft"}
    keys = ["greedy_accuracy", f"mean@{cfg.eval.k}", f"pass@{cfg.eval.k}"]
    paths = [plots.accuracy_by_stage(metrics, out / "accuracy.png", keys)]
    if cfg.eval.benchmarks:
        tables = benchmark_tables(cfg, refs)
        paths.append(plots.benchmarks_by_checkpoint({m: tables[m] for m in ("mean@k", "greedy_accuracy")},
                                                    out / "benchmarks.png"))
    if any(histories.values()):
        paths.append(plots.training_curves(histories, out / "training.png", along_chain=True))
    if any(rounds.values()):
        paths.append(plots.rewards_by_source(rounds, out / "rewards.png"))
    return paths


def _plots_key(cfg: RunConfig, refs: dict[str, ArtifactRef]) -> str:
    """What the plots are drawn from: the outputs' digests (metrics, histories), chain, eval.k, plotting code."""
    code = inspect.getsource(plots) + inspect.getsource(_draw_plots)
    text = json.dumps({"refs": {name: ref.sha256 for name, ref in refs.items()}, "chain": list(cfg.chain),
                       "k": cfg.eval.k, "code": hashlib.sha256(code.encode()).hexdigest()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def primary_benchmark(cfg: RunConfig) -> str:
    """The benchmark whose metrics stand for a checkpoint (the summary's first table, experiments, `RunResult.metrics`):
    the held-out split when graded, else the first benchmark listed."""
    names = [b.name for b in cfg.eval.suite()]
    return HELDOUT if HELDOUT in names else names[0]


def eval_label(checkpoint: str, benchmark: str, primary: str) -> str:
    """An evaluation's name in the run's references and MLflow metrics: `eval/<checkpoint>` on the primary
    benchmark, `eval/<checkpoint>/<benchmark>` on any other."""
    return f"eval/{checkpoint}" if benchmark == primary else f"eval/{checkpoint}/{benchmark}"


def benchmark_tables(cfg: RunConfig, refs: dict[str, ArtifactRef]) -> dict[str, dict[str, dict[str, float]]]:
    """metric -> checkpoint -> benchmark -> value, with each checkpoint's unweighted average over the benchmarks
    (the paper's "Avg." column); `mean@k` and `pass@k` at each benchmark's own k."""
    primary, suite = primary_benchmark(cfg), cfg.eval.suite()
    checkpoints = [c for c in ("base", *cfg.chain) if f"eval/{c}" in refs]
    cells = {(c, b.name): (cfg.eval.for_benchmark(b).k, read_output(refs[label]).eval_metrics())
             for c in checkpoints for b in suite if (label := eval_label(c, b.name, primary)) in refs}  # read once
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for metric in BENCHMARK_METRICS:
        table = tables[metric.format(k="k")] = {}
        for checkpoint in checkpoints:
            row = {b.name: value for b in suite if (cell := cells.get((checkpoint, b.name)))
                   and (value := cell[1].get(metric.format(k=cell[0]))) is not None}
            table[checkpoint] = {**row, "average": sum(row.values()) / len(row)} if row else {}
    return tables


STAGE_COLUMNS = {"wall_time_s": "wall_time_s", "perf/peak_rss_gb": "peak_rss_gb",
                 "perf/peak_child_rss_gb": "peak_child_rss_gb", "perf/peak_cuda_allocated_gb": "peak_cuda_allocated_gb",
                 "perf/peak_cuda_reserved_gb": "peak_cuda_reserved_gb"}
"""Manifest metric -> the summary's stage-table column."""


def stage_resources(cfg: RunConfig, refs: dict[str, ArtifactRef]) -> dict[str, dict[str, float]]:
    """Per stage output of the run (a GFT or GRPO stage: the max over its rounds), its wall time and peak memory,
    keyed by the summary's column names; outputs that record none (external models) are left out."""
    rows = {}
    for name, ref in refs.items():
        outputs = chain_outputs(refs, name).outputs if name in cfg.chain else [o for o in [find_output(ref)] if o]
        found = [{STAGE_COLUMNS[k]: v for k, v in o.metrics.items() if k in STAGE_COLUMNS} for o in outputs]
        row = {col: max(f[col] for f in found if col in f) for col in STAGE_COLUMNS.values()
               if any(col in f for f in found)}
        if row:
            rows[name if len(outputs) < 2 else f"{name} ({len(outputs)} rounds)"] = row
    return rows


def chain_stage(name: str) -> str:
    """The store's stage of a chain name: "sft" -> "sft", "gft" -> "gft_round", "grpo" -> "grpo_round"."""
    from pipeline import stages

    return f"{name}_round" if f"{name}_round" in stages.STAGES else name


def chain_outputs(refs: dict[str, ArtifactRef], name: str) -> Chain:
    """The outputs of chain stage `name` (SFT's one, or every round of GFT/GRPO), read from the store."""
    return read_chain(refs[name], chain_stage(name))


def stage_history(refs: dict[str, ArtifactRef], name: str) -> list[dict[str, float]]:
    """The per-step training history of chain stage `name` (every round's history, in order)."""
    return chain_outputs(refs, name).history


def round_metrics(refs: dict[str, ArtifactRef], name: str) -> list[dict[str, float]]:
    """The manifest metrics of each output of chain stage `name` (one per round; SFT's one)."""
    return chain_outputs(refs, name).round_metrics


def write_summary(path: Path, cfg: RunConfig, refs: dict[str, ArtifactRef], metrics: dict[str, dict[str, float]],
                   plot_paths: list[Path], tracker, registered: str | None) -> Path:
    from pipeline.algo.metrics import comparison_table

    primary = primary_benchmark(cfg)
    columns = [c.format(k=cfg.eval.for_benchmark(_benchmark(cfg, primary)).k) for c in TABLE_COLUMNS]
    title = "Held-out evaluation" if primary == HELDOUT else f"Evaluation on `{primary}`"
    lines = [f"# Run `{cfg.name}`", "", f"{title}:", "", comparison_table(metrics, columns=columns)]
    if cfg.eval.benchmarks:
        lines += _benchmark_section(cfg, refs)
    lines += _stage_section(cfg, refs) + ["Artifacts:", ""]
    lines += [f"- {name}: `{ref.uri}` (sha256 {ref.sha256[:12]})" for name, ref in refs.items()]
    lines += ["", "Plots:", ""] + [f"- `{p}`" for p in plot_paths]
    if registered:
        lines += ["", f"Final model registered as `{registered}`."]
    url = tracker.parent_url()
    if url:
        lines += ["", f"MLflow: {url} (start the UI with `gft ui`)"]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _benchmark(cfg: RunConfig, name: str):
    return next(b for b in cfg.eval.suite() if b.name == name)


def _benchmark_section(cfg: RunConfig, refs: dict[str, ArtifactRef]) -> list[str]:
    """The paper's layout: per metric, rows are checkpoints, columns the benchmarks and their average."""
    from pipeline.algo.metrics import comparison_table

    ks = {b.name: cfg.eval.for_benchmark(b).k for b in cfg.eval.suite()}
    lines = ["By benchmark (k per benchmark: " + ", ".join(f"{n} {k}" for n, k in ks.items()) + "):", ""]
    for metric, table in benchmark_tables(cfg, refs).items():
        lines += [f"`{metric}`:", "", comparison_table(table, columns=[*ks, "average"])]
    return lines


def _stage_section(cfg: RunConfig, refs: dict[str, ArtifactRef]) -> list[str]:
    """Each stage's wall time and peak memory (`stage_resources`); nothing when no output records them."""
    from pipeline.algo.metrics import comparison_table

    stages = stage_resources(cfg, refs)
    if not stages:
        return []
    columns = [c for c in STAGE_COLUMNS.values() if any(c in row for row in stages.values())]
    return ["Stages (wall time and peak memory as measured when each output was computed; GFT and GRPO: their "
            "largest round):", "", comparison_table(stages, columns=columns).replace("| checkpoint |", "| stage |", 1)]
