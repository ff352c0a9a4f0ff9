"""The report of an experiment (the trials of `pipeline.experiment.schema`, run by `pipeline.experiment.trials`):
each finished trial's numbers read from its stage outputs, the mean and sample std over seeds per variant, and the
files: results.md (a table per group), results.json, and the plots (accuracy against training prompts seen, entropy
and grad norm per step, one plot per sweep, e.g. the rectified fraction and accuracy against tau)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import plots
from pipeline.store.artifacts import ArtifactRef, write_text_atomic
from pipeline.store.outputs import read_output
from pipeline.config import RunConfig
from pipeline.experiment.schema import ExperimentConfig, Trial, TrialResult

__all__ = ["Report", "trial_metrics", "summarise", "write_report", "write_plots", "own_overrides", "short"]

METRICS = ("mean@{k}", "pass@{k}", "greedy_accuracy", "entropy", "kl_base_policy", "rectified_frac")


def trial_metrics(result: TrialResult) -> dict[str, Any]:
    """A finished trial's numbers: final held-out metrics, the chain's checkpoints with cumulative prompts seen,
    its per-step history (steps continued across the chain), its optimizer steps, and GFT's mean rectified
    fraction."""
    from pipeline.report import chain_outputs

    refs, cfg = result.refs, result.trial.config
    checkpoints = [("base", 0.0, _eval(refs, "base"))]
    history, seen, offset = [], 0.0, 0
    for stage in cfg.chain:
        chain = chain_outputs(refs, stage)
        rows = chain.history
        seen += _prompts_seen(cfg, stage, rows, chain.round_metrics, refs)
        checkpoints.append((stage, seen, _eval(refs, stage)))
        history += [{**r, "step": r["step"] + offset, "stage": stage} for r in rows]
        offset += int(max((r["step"] for r in rows), default=0))
    final = dict(checkpoints[-1][2])
    rect = [r["rectified_frac"] for r in history if r["stage"] == "gft" and "rectified_frac" in r]
    if rect:
        final["rectified_frac"] = sum(rect) / len(rect)
    return {"final": final, "checkpoints": checkpoints, "history": history, "prompts_seen": seen, "steps": offset}


def _eval(refs: Mapping[str, ArtifactRef], checkpoint: str) -> dict[str, float]:
    return read_output(refs[f"eval/{checkpoint}"]).eval_metrics()


def _prompts_seen(cfg: RunConfig, stage: str, history: Sequence[Mapping[str, float]],
                  rounds: Sequence[Mapping[str, float]], refs: Mapping[str, ArtifactRef]) -> float:
    """Training prompts a stage saw: rounds x prompts per round (GFT, GRPO); for SFT the sequences it trained on
    over the traces per prompt (its examples per prompt), at most its prompt count: one pass over one trace per
    prompt is every prompt, and more passes over the same prompts add optimizer steps, not prompts. (A part-pass
    of SFT(mix), several traces per prompt, counts prompt-equivalents: its sequences come from more prompts.)"""
    if stage == "gft":
        return float(cfg.gft.rounds * cfg.gft.prompts_per_round)
    if stage == "grpo":
        return float(cfg.grpo.rounds * cfg.grpo.prompts_per_round)
    import pyarrow.parquet as pq

    n_prompts = pq.ParquetFile(read_output(refs["prompts"]).file("train.parquet")).metadata.num_rows
    passes = sum(r.get("sequences", 0.0) for r in history) / max(rounds[0].get("examples", 1.0), 1.0)
    return n_prompts * min(passes, 1.0)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(results: Sequence[TrialResult], k: int, metric: str | None = None) -> dict[str, dict[str, Any]]:
    """Per variant, in grid order: mean and sample std over seeds of every reported metric, the seeds that
    finished, prompts seen, optimizer steps, and the mean checkpoint trajectory and per-step history. A variant
    run at several `[tune]` points is reported at the point whose mean `metric` (a validation metric) is highest,
    with every point's `metric` under "tuned"; the test metrics play no part in the pick."""
    points: dict[tuple[str, str], list[TrialResult]] = {}
    for r in results:
        points.setdefault((r.trial.variant, r.trial.tag), []).append(r)
    cols = [c.format(k=k) for c in METRICS] + ([metric] if metric else [])
    rows = {key: _variant_row(group, cols, k) for key, group in points.items()}
    out = {}
    for variant in dict.fromkeys(v for v, _ in points):
        keys = [key for key in points if key[0] == variant]
        out[variant] = rows[keys[0]] if keys == [(variant, "")] else _pick(keys, rows, points, metric)
    return out


def _variant_row(results: Sequence[TrialResult], cols: Sequence[str], k: int) -> dict[str, Any]:
    """One variant (at one grid point) over its seeds."""
    done = [(r, trial_metrics(r)) for r in results if r.refs is not None]
    t = results[0].trial
    row: dict[str, Any] = {"label": t.label, "group": t.group, "x": t.x, "chain": list(t.config.chain),
                           "seeds": [r.trial.seed for r, _ in done]}
    if done:
        row["prompts_seen"] = done[0][1]["prompts_seen"]
        row["steps"] = done[0][1]["steps"]
        for col in cols:
            values = [m["final"][col] for _, m in done if col in m["final"]]
            if values:
                row[col] = _mean_std(values)
        row["checkpoints"] = _mean_checkpoints([m["checkpoints"] for _, m in done], k)
        row["history"] = _mean_history([m["history"] for _, m in done])
    return row


def _pick(keys: Sequence[tuple[str, str]], rows: Mapping[tuple[str, str], dict[str, Any]],
          points: Mapping[tuple[str, str], Sequence[TrialResult]], metric: str | None) -> dict[str, Any]:
    """The grid point with the highest mean `metric` (the first such point on a tie), with the whole grid."""
    if metric is None:
        raise ValueError("summarise: a variant ran at several [tune] points, so a validation metric must pick one")
    scored = [key for key in keys if metric in rows[key]]
    best = max(scored, key=lambda key: rows[key][metric][0]) if scored else keys[0]
    grid = [{"value": points[key][0].trial.point, "tag": key[1], metric: rows[key].get(metric),
             "seeds": rows[key]["seeds"]} for key in keys]
    return {**rows[best], "tuned": {"metric": metric, "picked": points[best][0].trial.point, "tag": best[1],
                                    "grid": grid}}


def _mean_checkpoints(runs: Sequence[Sequence[tuple]], k: int) -> list[dict[str, Any]]:
    """[(stage, prompts seen, metrics)] per seed -> per checkpoint: prompts seen and (mean, std) per metric."""
    out = []
    for i, (stage, seen, _) in enumerate(runs[0]):
        point = {"stage": stage, "prompts_seen": seen}
        for col in ("greedy_accuracy", f"mean@{k}"):
            point[col] = _mean_std([run[i][2][col] for run in runs])
        out.append(point)
    return out


def _mean_history(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, float]]:
    """Per-step means over seeds (steps every seed reached)."""
    rows = []
    for step_rows in zip(*runs):
        keys = set.intersection(*(set(k for k, v in r.items() if isinstance(v, (int, float))) for r in step_rows))
        rows.append({key: sum(r[key] for r in step_rows) / len(step_rows) for key in keys})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """The written report: markdown, the table as JSON, the plots, and flat metrics for MLflow."""

    report: Path
    table_json: Path
    plots: list[Path]
    flat_metrics: dict[str, float]


def write_report(exp: ExperimentConfig, results: Sequence[TrialResult], out: Path) -> Report:
    """results.md (a table per group: mean ± std over seeds), results.json, and the plots, under `out`."""
    k = results[0].trial.config.eval.k
    rows = summarise(results, k, exp.tune.metric.format(k=k) if exp.tune else None)
    plot_paths = write_plots(exp, rows, k, out)
    md = _markdown(exp, results, rows, k, plot_paths)
    report = write_text_atomic(out / "results.md", md)
    table = write_text_atomic(out / "results.json", json.dumps(
        {"experiment": exp.model_dump(mode="json"), "k": k, "variants": rows,
         "trials": [_trial_json(r) for r in results]}, indent=1, default=_json_default))
    flat = {f"{name}/{col}_{stat}": v for name, row in rows.items() for col, pair in row.items()
            if isinstance(pair, tuple) for stat, v in zip(("mean", "std"), pair) if not math.isnan(v)}
    flat.update({f"{name}/tuned_value": float(row["tuned"]["picked"]) for name, row in rows.items() if "tuned" in row})
    return Report(report, table, plot_paths, flat)


def _trial_json(r: TrialResult) -> dict[str, Any]:
    return {"id": r.trial.id, "variant": r.trial.variant, "seed": r.trial.seed, "point": r.trial.point,
            "overrides": r.trial.overrides,
            "wall_s": round(r.wall_s, 1), "error": r.error,
            "refs": {k: v.model_dump(mode="json") for k, v in (r.refs or {}).items()}}


def _json_default(obj: Any) -> Any:
    return obj.item() if hasattr(obj, "item") else str(obj)


def _cell(pair: tuple[float, float] | None) -> str:
    if pair is None:
        return "-"
    mean, std = pair
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _table(rows: Mapping[str, Mapping[str, Any]], k: int) -> list[str]:
    cols = [c.format(k=k) for c in METRICS]
    tuned = any("tuned" in row for row in rows.values())
    head = ["variant", "chain", "prompts seen", "steps", *(["picked"] if tuned else []), "seeds", *cols]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in rows.items():
        chain = " → ".join(row["chain"]) or "(base)"
        seen = f"{row['prompts_seen']:.0f}" if "prompts_seen" in row else "-"
        steps = f"{row['steps']}" if "steps" in row else "-"
        picked = [row["tuned"]["tag"] if "tuned" in row else "-"] if tuned else []
        cells = [row["label"], chain, seen, steps, *picked, str(len(row["seeds"])), *(_cell(row.get(c)) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _grid_table(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each tuned variant's validation metric at every grid point (mean ± std over seeds), the pick in bold."""
    tuned = {n: r["tuned"] for n, r in rows.items() if "tuned" in r}
    if not tuned:
        return []
    metric = next(iter(tuned.values()))["metric"]
    values = list(dict.fromkeys(p["value"] for t in tuned.values() for p in t["grid"]))
    lines = [f"## Tuning grid: validation {metric}", "",
             "Each tuned row of the tables above is the point in bold: the highest mean over seeds on the "
             "validation prompts. The test prompts pick nothing.", "",
             "| variant | " + " | ".join(f"{v:g}" for v in values) + " |", "|---" * (len(values) + 1) + "|"]
    for name, t in tuned.items():
        at = {p["value"]: p for p in t["grid"]}
        cells = [_cell(at[v][metric]) if v in at else "-" for v in values]
        cells = [f"**{c}**" if v == t["picked"] else c for v, c in zip(values, cells)]
        lines.append(f"| {rows[name]['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _markdown(exp: ExperimentConfig, results: Sequence[TrialResult], rows: Mapping[str, Mapping[str, Any]],
              k: int, plot_paths: Sequence[Path]) -> str:
    lines = [f"# Experiment `{exp.name}`", "",
             f"Base config `{exp.base}`; seeds {list(exp.seeds)}. Cells: mean ± sample std over seeds of the "
             f"final checkpoint's held-out metrics (mean@{k}, pass@{k} and greedy accuracy, token entropy, "
             f"KL(base || policy)); rectified_frac is the mean over GFT steps of the share of tokens with p <= tau. "
             "Prompts seen: rounds x prompts per round for GFT and GRPO; for SFT, sequences trained over traces per "
             "prompt, at most its prompt count. Steps: optimizer steps over the chain.",
             ""]
    for group in dict.fromkeys(r["group"] for r in rows.values()):
        title = "Variants" if group == "variants" else f"Sweep `{group}`"
        lines += [f"## {title}", "", *_table({n: r for n, r in rows.items() if r["group"] == group}, k), ""]
    lines += _grid_table(rows)
    failed = [r for r in results if r.error]
    if failed:
        lines += ["## Failed trials", ""] + [f"- `{r.trial.id}`: {r.error}" for r in failed] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plot_paths] + [""]
    lines += ["## Trials", "", f"Every trial sets {short(exp.overrides) or 'nothing else'} and writes its seed "
              f"into {', '.join(exp.seed_fields)}. Wall time includes stages served from the cache.", "",
              "| trial | chain | wall s | its own overrides |", "|---|---|---|---|"]
    lines += [f"| {r.trial.id} | {' → '.join(r.trial.config.chain) or '(base)'} | {r.wall_s:.0f} | "
              f"`{short(own_overrides(exp, r.trial))}` |" for r in results]
    return "\n".join(lines) + "\n"


def own_overrides(exp: ExperimentConfig, trial: Trial) -> dict[str, Any]:
    """The fields a trial changes beyond what every trial changes (the experiment's overrides, seed, names)."""
    common = {*exp.overrides, *exp.seed_fields, "chain", "name", "tracking.experiment", "tracking.registered_model"}
    return {k: v for k, v in trial.overrides.items() if k not in common or v != exp.overrides.get(k, v)}


def short(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()).replace("|", "\\|")


def write_plots(exp: ExperimentConfig, rows: Mapping[str, Mapping[str, Any]], k: int, out: Path) -> list[Path]:
    """accuracy_vs_prompts.png and steps.png for the variants; tuning.png (the validation metric over the
    `[tune]` grid); one plot per sweep (rectified fraction and accuracy against the swept value, e.g. tau)."""
    done = {n: r for n, r in rows.items() if "checkpoints" in r}
    main = {n: r for n, r in done.items() if r["group"] == "variants"}
    paths = []
    if main:
        curves = {r["label"]: r["checkpoints"] for r in main.values()}
        paths.append(plots.accuracy_vs_prompts(curves, out / "accuracy_vs_prompts.png",
                                               ("greedy_accuracy", f"mean@{k}")))
        steps = {r["label"]: r["history"] for r in main.values() if r["history"]}
        if steps:
            paths.append(plots.training_curves(steps, out / "steps.png", keys=("entropy", "grad_norm"),
                                               title="Entropy and grad norm per optimizer step (mean over seeds)"))
    tuned = {r["label"]: r["tuned"] for r in done.values() if "tuned" in r}
    if tuned:
        metric = next(iter(tuned.values()))["metric"]
        curves = {label: [(p["value"], p[metric]) for p in t["grid"]] for label, t in tuned.items()}
        paths.append(plots.tuning(curves, {label: t["picked"] for label, t in tuned.items()}, out / "tuning.png",
                                  exp.tune.field.format(stage="<stage>"), metric))
    for group in dict.fromkeys(r["group"] for r in done.values() if r["group"] != "variants"):
        points = [r for r in done.values() if r["group"] == group]
        axis = exp.sweeps[group].label or exp.sweeps[group].field or group
        paths.append(plots.sweep([(r["x"], {c: r.get(c) for c in ("rectified_frac", "greedy_accuracy", f"mean@{k}")})
                                  for r in points], out / f"sweep_{group}.png", axis))
    return paths
