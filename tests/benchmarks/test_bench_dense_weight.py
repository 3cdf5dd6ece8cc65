"""``bench_dense_weight.py`` prints one row per shape, with the conversions between columns that it states.

The times and rates are whatever the host manages (a loaded CI machine is slow): they are only checked to be
finite and non-negative. What is checked exactly is what holds at any speed: the rows, the factor shapes, and
that each derived column is the stated conversion of the others, within the rounding of the printed digits.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def interval(cell: str) -> tuple[float, float]:
    """The values a printed cell can stand for: half a unit of its last digit either side."""
    half = 0.5 * 10.0 ** -len(cell.partition(".")[2])
    value = float(cell)
    return value - half, value + half


def product(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """The interval of ``a × b`` for non-negative quantities (with relative slack for float rounding)."""
    return max(0.0, a[0]) * max(0.0, b[0]) * (1 - 1e-9), a[1] * b[1] * (1 + 1e-9)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def test_prints_a_row_per_shape_with_the_stated_conversion() -> None:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_dense_weight.py"),
        "--tokens",
        "8",
        "--repeats",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    assert [row.split(" | ")[0] for row in rows] == ["| 4096x4096", "| 11008x4096", "| 576x576", "| 1536x576"]
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 8, row
        out_f, in_f = (int(d) for d in cells[0].split("x"))
        terms = re.fullmatch(r"(\d+) \[(\d+), (\d+), (\d+), (\d+)\]", cells[1])
        assert terms, row
        r, m, n, p, q = (int(g) for g in terms.groups())
        assert r >= 1 and (m * p, n * q) == (out_f, in_f), row  # A_k (m × n) ⊗ B_k (p × q) is out × in
        values = [float(c) for c in cells[2:]]
        assert all(math.isfinite(v) and v >= 0 for v in values), row
        fresh_ms, fresh_ns, reused_ms, reused_ns, rate, macs = (interval(c) for c in cells[2:])
        per_element = (1e6 / (out_f * in_f),) * 2  # ms for the whole weight → ns per element
        assert overlap(product(fresh_ms, per_element), fresh_ns), row
        assert overlap(product(reused_ms, per_element), reused_ns), row
        assert overlap(product(reused_ns, rate), macs), row  # ns × GMAC/s = multiply-adds
