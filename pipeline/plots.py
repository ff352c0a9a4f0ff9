"""PNG plots of a finished run: reward by source per round, training curves per step, accuracy per stage.

Inputs are plain numbers read from stage outputs (history.jsonl rows, round metrics, eval metrics), so the
plots work the same for fresh and cached stages. matplotlib with the Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["training_curves", "rewards_by_source", "accuracy_by_stage"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    _pyplot().close(fig)
    return path


def training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path,
                    keys: Sequence[str] = ("loss", "grad_norm", "entropy", "rectified_frac")) -> Path:
    """One panel per metric, one line per training stage, x = the stage's optimizer step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for stage, rows in histories.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=stage)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Training curves")
    return _save(fig, path)


def rewards_by_source(rounds: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path:
    """Mean reward of each group source (expert, teacher, policy) per round, one panel per round-based stage."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(rounds), 1), figsize=(5 * max(len(rounds), 1), 3.4), squeeze=False)
    for ax, (stage, metrics) in zip(axes[0], rounds.items()):
        sources = sorted({k.split("/", 1)[1] for m in metrics for k in m if k.startswith("reward/")})
        for src in sources:
            ax.plot(range(len(metrics)), [m.get(f"reward/{src}", float("nan")) for m in metrics], marker="o",
                    label=src)
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
