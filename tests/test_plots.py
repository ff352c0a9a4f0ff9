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
