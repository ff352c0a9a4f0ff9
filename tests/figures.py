"""Figures checked by their content: which of matplotlib's cycle colours a PNG draws, and how much of each."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pixels_of(path: Path, color: str, *, min_alpha: float = 0.5) -> int:
    """How many pixels of the PNG at `path` show the matplotlib colour `color` (e.g. "C0") drawn over white at an
    opacity of `min_alpha` or more (a series drawn with alpha=0.85 counts; grey axes and black text do not)."""
    import matplotlib.colors
    import matplotlib.image

    ink = 1.0 - np.asarray(matplotlib.image.imread(path))[..., :3].astype(np.float64)  # [H, W, 3]: 0 is white
    want = 1.0 - np.asarray(matplotlib.colors.to_rgb(color))  # [3]
    alpha = np.clip(ink @ want / (want @ want), 0.0, 1.0)  # [H, W]: the opacity that best explains each pixel
    residual = np.abs(ink - alpha[..., None] * want).max(axis=-1)
    return int(((residual < 3 / 255) & (alpha >= min_alpha)).sum())


def assert_draws(path: Path, colors: tuple[str, ...] = ("C0",), *, at_least: int = 20) -> None:
    """The PNG at `path` decodes and draws every colour of `colors` (data series, not only axes and text)."""
    missing = {c: n for c in colors if (n := pixels_of(Path(path), c)) < at_least}
    assert not missing, f"{path}: colours drawn in fewer than {at_least} pixels: {missing}"
