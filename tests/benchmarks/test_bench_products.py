"""``bench_products.py`` times every layout it documents and prints one rate per row.

The rates are whatever the host manages (a loaded CI machine is slow), so they are only checked to be finite
and non-negative numbers; the rows are checked exactly."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_prints_a_rate_for_every_layout() -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_products.py"), "--chunk", "2", "--calls", "1"]
    proc = subprocess.run([*cmd, "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 4096²")]
    assert len(rows) == 10
    products = [row.split(" | ")[1] for row in rows]
    assert products.count("dZ") == 2 and products.count("dA accumulation") == 2
    rates = [float(row.strip(" |").rsplit("|", 1)[1]) for row in rows]
    assert all(math.isfinite(r) and r >= 0 for r in rates), rows
