"""``bench_dense_weight.py`` prints one row per shape, with positive times and the conversion it states."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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
        fresh_ms, fresh_ns, reused_ms, reused_ns, rate, macs = (float(c) for c in cells[2:])
        assert min(fresh_ms, fresh_ns, reused_ms, reused_ns, rate) > 0
        assert abs(macs - reused_ns * rate) <= 0.5 + 0.02 * macs  # ns × GMAC/s = multiply-adds
