"""Numbers for the benchmarks' markdown tables."""

from __future__ import annotations

import math


def significant(value: float, digits: int = 3) -> str:
    """``value`` in fixed point with at least ``digits`` significant digits: a small measurement (a rate on a
    slow or loaded host, a short time) keeps its leading digits instead of printing as ``0.0``."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.0f}"
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}"
