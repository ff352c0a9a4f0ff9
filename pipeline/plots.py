"""PNG plots of a finished run: reward by source per round, training curves per step, accuracy per stage.

Inputs are plain numbers read from stage outputs (history.jsonl rows, round metrics, eval metrics), so the
plots work the same for fresh and cached stages. matplotlib with the Agg backend: no display needed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.atomic import write_bytes_atomic

__all__ = ["training_curves", "chain_steps", "rewards_by_source", "accuracy_by_stage", "benchmarks_by_checkpoint",
           "accuracy_vs_prompts", "sweep"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"{x:g}")


def _save(fig, path: Path) -> Path:
    """The figure as a PNG at `path`, written through a temp name unique to this writer (two runs on one root
    write the same report at once; the last rename wins, whole)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return write_bytes_atomic(Path(path), buf.getvalue())


def chain_steps(histories: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, int]:
    """The optimizer steps taken before each stage of a chain (SFT -> GFT -> GRPO, each from the last one's model):
    the x offset of its curve, so each stage continues where the one before ended."""
    offsets, done = {}, 0
    for stage, rows in histories.items():
        offsets[stage] = done
        done += max((int(r["step"]) for r in rows), default=0)
    return offsets


def training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path,
                    keys: Sequence[str] = ("loss", "grad_norm", "entropy", "rectified_frac"),
                    title: str = "Training curves", along_chain: bool = False) -> Path:
    """One panel per metric, one line per training stage (or variant), x = its optimizer step. `along_chain`: the
    stages follow each other, so x counts the chain's steps (each stage offset by the steps before it, `chain_steps`)
    and a dashed line marks where each stage after the first begins."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    colors = {stage: f"C{i}" for i, stage in enumerate(histories)}  # one colour per stage in every panel
    offsets = chain_steps(histories) if along_chain else dict.fromkeys(histories, 0)
    for ax, key in zip(axes[0], keys):
        for stage, rows in histories.items():
            pts = [(offsets[stage] + r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=stage, color=colors[stage])
        if along_chain:
            _stage_boundaries(ax, offsets, colors)
        ax.set_title(key)
        ax.set_xlabel("optimizer step of the chain" if along_chain else "optimizer step")
        ax.grid(alpha=0.3)
    _legend_of_all_panels(axes[0])
    fig.suptitle(title, y=1.03)
    return _save(fig, path)


def _stage_boundaries(ax, offsets: Mapping[str, int], colors: Mapping[str, str]) -> None:
    """A dashed vertical line, in the stage's colour, half a step before each later stage's first step."""
    for stage, start in list(offsets.items())[1:]:
        ax.axvline(start + 0.5, color=colors[stage], linestyle="--", linewidth=0.8, label=f"_start of {stage}")


def _legend_of_all_panels(axes) -> None:
    """One legend, right of the last panel, naming every line of every panel once: a line drawn only in some
    panels (GRPO has no rectified fraction, the last panel) is still named."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        axes[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="center left",
                        bbox_to_anchor=(1.02, 0.5))


def rewards_by_source(rounds: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path:
    """Mean reward of each group source (expert, teacher, policy) per round, one panel per round-based stage;
    a stage without sources (GRPO: every sample is the policy's) shows its mean reward as the policy's."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(rounds), 1), figsize=(5 * max(len(rounds), 1), 3.4), squeeze=False)
    for ax, (stage, metrics) in zip(axes[0], rounds.items()):
        sources = sorted({k.split("/", 1)[1] for m in metrics for k in m if k.startswith("reward/")})
        for src, key in [(src, f"reward/{src}") for src in sources] or [("policy", "reward")]:
            ax.plot(range(len(metrics)), [m.get(key, float("nan")) for m in metrics], marker="o", label=src)
        ax.set_title(f"{stage}: reward by source")
        ax.set_xlabel("round")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_by_stage(metrics: Mapping[str, Mapping[str, float]], path: Path, keys: Sequence[str]) -> Path:
    """Grouped bars: held-out accuracy metrics of every checkpoint (base, then each chain stage)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(metrics), 3.4))
    width = 0.8 / max(len(keys), 1)
    for j, key in enumerate(keys):
        xs = [i + j * width for i in range(len(metrics))]
        ax.bar(xs, [m.get(key, float("nan")) for m in metrics.values()], width, label=key)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(metrics))], list(metrics))
    ax.set_ylim(0, 1)
    ax.set_title("Held-out accuracy by stage")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def benchmarks_by_checkpoint(tables: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> Path:
    """One panel per metric (`tables`: metric -> checkpoint -> benchmark -> value, the summary's tables); in each,
    grouped bars: one group per checkpoint, one bar per benchmark and their average (hatched)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(1.5 + 3.6 * len(tables), 3.6), squeeze=False)
    for ax, (metric, table) in zip(axes[0], tables.items()):
        names = list(dict.fromkeys(b for row in table.values() for b in row))
        width = 0.8 / max(len(names), 1)
        for j, bench in enumerate(names):
            xs = [i + j * width for i in range(len(table))]
            ax.bar(xs, [row.get(bench, float("nan")) for row in table.values()], width, label=bench,
                   color=f"C{j}", hatch="//" if bench == "average" else None, edgecolor="white")
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(table))], list(table))
        ax.set_ylim(0, 1)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Evaluation by benchmark", y=1.03)
    return _save(fig, path)


def _errorbar(ax, xs: Sequence[float], pairs: Sequence[tuple[float, float] | None], **kw) -> None:
    """Mean with a ±std bar per point (no bar where the std is unknown: a single seed)."""
    pts = [(x, p) for x, p in zip(xs, pairs) if p is not None]
    if pts:
        errs = [0.0 if s != s else s for _, (_, s) in pts]  # NaN std (one seed): no bar
        ax.errorbar([x for x, _ in pts], [m for _, (m, _) in pts], yerr=errs, capsize=3, **kw)


def accuracy_vs_prompts(curves: Mapping[str, Sequence[Mapping]], path: Path, keys: Sequence[str]) -> Path:
    """One panel per accuracy metric; one line per variant through its checkpoints (base, then each stage of its
    chain), x = training prompts seen so far, y = mean ± std over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, points) in enumerate(curves.items()):
            _errorbar(ax, [p["prompts_seen"] for p in points], [p.get(key) for p in points], marker="o",
                      label=label, alpha=0.85, color=f"C{i}")
        ax.set_xscale("symlog", linthresh=10)
        ax.xaxis.set_major_formatter(_plain_ticks())
        ax.set_xlabel("training prompts seen (log scale above 10)")
        ax.set_title(f"held-out {key}")
        ax.grid(alpha=0.3)
    _legend_of_all_panels(axes[0])
    return _save(fig, path)


def sweep(points: Sequence[tuple[object, Mapping[str, tuple[float, float] | None]]], path: Path,
          axis: str) -> Path:
    """One panel per metric against the swept value (numeric values on a numeric axis, names as categories),
    mean ± std over seeds, e.g. the rectified fraction and accuracy against tau."""
    plt = _pyplot()
    keys = list(dict.fromkeys(k for _, m in points for k, v in m.items() if v is not None))
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points)
    xs = [float(x) for x, _ in points] if numeric else list(range(len(points)))
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.5 * max(len(keys), 1), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        _errorbar(ax, xs, [m.get(key) for _, m in points], marker="o")
        if not numeric:
            ax.set_xticks(xs, [str(x) for x, _ in points])
        ax.set_xlabel(axis)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Sweep over {axis} (mean ± std over seeds)", y=1.03)
    return _save(fig, path)


def tuning(curves: Mapping[str, Sequence[tuple[float, tuple[float, float] | None]]],
           picked: Mapping[str, float], path: Path, axis: str, metric: str) -> Path:
    """A tuning grid: the validation metric (mean ± std over seeds) against the grid value on a log axis, one
    line per variant, each variant's picked point ringed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, points in curves.items():
        xs = [x for x, _ in points]
        _errorbar(ax, xs, [pair for _, pair in points], marker="o", label=label)
        best = dict(points).get(picked[label])
        if best is not None:
            ax.scatter([picked[label]], [best[0]], s=180, facecolors="none", edgecolors="black", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"Validation {metric} over the grid (ringed: each variant's pick)")
    return _save(fig, path)
