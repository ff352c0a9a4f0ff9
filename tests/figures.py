"""Figures checked by their content: which of matplotlib's cycle colours a PNG draws, and how much of each."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pixels_of(path: Path, color: str) -> int:
    """How many pixels of the PNG at `path` have exactly the matplotlib colour `color` (e.g. "C0")."""
    import matplotlib.colors
    import matplotlib.image

    rgb = np.asarray(matplotlib.image.imread(path))[..., :3]  # [H, W, 3]
    want = np.asarray(matplotlib.colors.to_rgb(color))
    return int((np.abs(rgb - want).max(axis=-1) < 2 / 255).sum())


def assert_draws(path: Path, colors: tuple[str, ...] = ("C0",), *, at_least: int = 20) -> None:
    """The PNG at `path` decodes and draws every colour of `colors` (data series, not only axes and text)."""
    missing = {c: n for c in colors if (n := pixels_of(Path(path), c)) < at_least}
    assert not missing, f"{path}: colours drawn in fewer than {at_least} pixels: {missing}"
