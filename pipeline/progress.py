"""Progress bars for long steps (sampling, training): tqdm by default, rich bars when `use_rich()` was called
(the `gft` CLI does) and the output is a terminal."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any

__all__ = ["bar", "use_rich"]

_RICH = False


def use_rich(enabled: bool = True) -> None:
    """Draw later bars with rich (only where stderr is a terminal; logs stay plain)."""
    global _RICH
    _RICH = enabled


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        initial: int = 0, disable: bool = False) -> Any:
    """A tqdm-compatible bar (`update`, `set_postfix`, `close`, iteration)."""
    if _RICH and not disable and sys.stderr.isatty():
        from tqdm import TqdmExperimentalWarning
        from tqdm.rich import tqdm as rich_tqdm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TqdmExperimentalWarning)
            return rich_tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable)
