"""What the run's plots draw (their lines and labels), read back from the figure before it is saved."""

import math

from pipeline import plots


def _drawn(monkeypatch, make):
    """Call a plot function; return {panel title: {label: y values}} of the figure it saved."""
    figs = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(
        {ax.get_title(): {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()} for ax in fig.axes})
        or save(fig, path))
    path = make()
    assert path.stat().st_size > 1000
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
