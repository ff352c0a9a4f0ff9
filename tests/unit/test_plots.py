"""What the run's plots draw (their lines and labels), read back from the figure before it is saved."""

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipeline import plots


def _pixels_of(path: Path, color: str) -> int:
    """How many pixels of the PNG at `path` have exactly the matplotlib colour `color` (e.g. "C0")."""
    import matplotlib.colors
    import matplotlib.image

    rgb = np.asarray(matplotlib.image.imread(path))[..., :3]
    want = np.asarray(matplotlib.colors.to_rgb(color))
    return int((np.abs(rgb - want).max(axis=-1) < 2 / 255).sum())


def _drawn(monkeypatch, make, colors=("C0", "C1")):
    """Call a plot function; return {panel title: {label: y values}} of the figure it saved, after checking that
    the PNG it wrote draws every colour of `colors` (its content, not its size)."""
    figs = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(
        {ax.get_title(): {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()} for ax in fig.axes})
        or save(fig, path))
    path = make()
    assert all(_pixels_of(path, c) > 20 for c in colors), {c: _pixels_of(path, c) for c in colors}
    return figs[0]


def test_rewards_by_source_draws_group_sources_and_grpo_mean_reward(monkeypatch, tmp_path):
    rounds = {"gft": [{"reward/expert": 1.0, "reward/policy": 0.25}, {"reward/expert": 1.0, "reward/policy": 0.5}],
              "grpo": [{"reward": 0.3, "rewards/exact_match/mean": 0.3}, {"reward": 0.4}]}
    drawn = _drawn(monkeypatch, lambda: plots.rewards_by_source(rounds, tmp_path / "rewards.png"))
    assert drawn["gft: reward by source"] == {"expert": [1.0, 1.0], "policy": [0.25, 0.5]}
    assert drawn["grpo: reward by source"] == {"policy": [0.3, 0.4]}  # no sources: the mean reward is the policy's
    assert not any(math.isnan(y) for lines in drawn.values() for ys in lines.values() for y in ys)


def _legend(monkeypatch, make) -> tuple[list[str], dict[str, set]]:
    """Call a plot function; return the legend labels of the figure it saved and each label's colours."""
    seen = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig) or save(fig, path))
    make()
    fig = seen[0]
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    colors: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colors.setdefault(line.get_label(), set()).add(line.get_color())
    return labels, colors


def test_training_legend_names_a_stage_missing_from_the_last_panel(monkeypatch, tmp_path):
    """GRPO logs no rectified fraction (the last panel): its curve must still be in the legend, in one colour."""
    row = {"loss": 1.0, "grad_norm": 0.5, "entropy": 0.3}
    histories = {"sft": [{"step": 1, **row}, {"step": 2, **row}],
                 "gft": [{"step": 1, **row, "rectified_frac": 0.1}, {"step": 2, **row, "rectified_frac": 0.2}],
                 "grpo": [{"step": 1, **row}, {"step": 2, **row}]}
    labels, colors = _legend(monkeypatch, lambda: plots.training_curves(histories, tmp_path / "training.png"))
    assert labels == ["sft", "gft", "grpo"]
    assert all(len(c) == 1 for c in colors.values()) and len(set.union(*colors.values())) == 3, colors


def _xs(monkeypatch, make) -> dict[str, dict[str, list[float]]]:
    """{panel title: {label: x values}} of the figure a plot function saved."""
    seen = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(
        {ax.get_title(): {ln.get_label(): [float(x) for x in ln.get_xdata()] for ln in ax.get_lines()}
         for ax in fig.axes}) or save(fig, path))
    make()
    return seen[0]


def test_training_curves_follow_the_chain_with_its_stage_boundaries_marked(monkeypatch, tmp_path):
    """Issue 26 item 7: every stage's steps restarted at 1, so SFT, GFT and GRPO lay on top of each other. Along the
    chain, GFT continues after SFT's last step and GRPO after GFT's, each start marked."""
    row = {"loss": 1.0, "grad_norm": 0.5, "entropy": 0.3}
    histories = {"sft": [{"step": s, **row} for s in (1, 2, 3)], "gft": [{"step": s, **row} for s in (1, 2)],
                 "grpo": [{"step": s, **row} for s in (1, 2)]}
    path = tmp_path / "training.png"
    xs = _xs(monkeypatch, lambda: plots.training_curves(histories, path, along_chain=True))["loss"]
    assert xs == {"sft": [1, 2, 3], "gft": [4, 5], "grpo": [6, 7],
                  "_start of gft": [3.5, 3.5], "_start of grpo": [5.5, 5.5]}
    assert all(_pixels_of(path, c) > 20 for c in ("C0", "C1", "C2"))
    parallel = _xs(monkeypatch, lambda: plots.training_curves(histories, tmp_path / "variants.png"))["loss"]
    assert parallel == {"sft": [1, 2, 3], "gft": [1, 2], "grpo": [1, 2]}  # variants side by side: no offset


def _write_accuracy(path: str, times: int) -> int:
    for _ in range(times):
        plots.accuracy_by_stage({"base": {"acc": 0.2}, "gft": {"acc": 0.6}}, Path(path), ["acc"])
    return times


def test_two_writers_of_one_plot_at_once_both_finish(tmp_path):
    """Issue 26 item 4: two runs on one root wrote the same `accuracy.tmp.png` and one failed renaming it. Two
    processes now write the same plot at once, repeatedly: both finish, the PNG is whole, no temp file is left."""
    path = tmp_path / "reports" / "accuracy.png"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        done = [f.result(timeout=300) for f in [pool.submit(_write_accuracy, str(path), 12) for _ in range(2)]]
    assert done == [12, 12]
    assert _pixels_of(path, "C0") > 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["accuracy.png"]


@pytest.mark.parametrize("make", ["rewards", "sweep"])
def test_other_plots_write_whole_pngs(tmp_path, make):
    path = tmp_path / f"{make}.png"
    if make == "rewards":
        plots.rewards_by_source({"gft": [{"reward/expert": 1.0}, {"reward/expert": 0.5}]}, path)
    else:
        plots.sweep([(0.1, {"acc": (0.5, 0.1)}), (0.5, {"acc": (0.7, 0.0)})], path, "tau")
    assert _pixels_of(path, "C0") > 20


def test_benchmarks_plot_draws_a_bar_per_benchmark_and_the_average_per_checkpoint(monkeypatch, tmp_path):
    bars = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: bars.append(
        {ax.get_title(): [(p.get_x(), p.get_height()) for p in ax.patches] for ax in fig.axes}) or save(fig, path))
    table = {"base": {"heldout": 0.5, "gsm8k": 0.0, "average": 0.25},
             "sft": {"heldout": 0.75, "gsm8k": 0.25, "average": 0.5}}
    path = plots.benchmarks_by_checkpoint({"mean@k": table, "greedy_accuracy": table}, tmp_path / "b.png")
    heights = sorted(h for _, h in bars[0]["mean@k"])
    assert heights == sorted([0.5, 0.0, 0.25, 0.75, 0.25, 0.5]) and set(bars[0]) == {"mean@k", "greedy_accuracy"}
    for color in ("C0", "C1", "C2"):  # heldout, gsm8k, average (hatched: part of its area)
        assert _pixels_of(path, color) > 20, color
