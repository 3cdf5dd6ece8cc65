"""``bench_layer.py --layers``: sizes parse, and a malformed one stops with a message naming the option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bad_layers_value_stops_with_a_message() -> None:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_layer.py"),
        "--only",
        "layers",
        "--layers",
        "4096x40a6",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert (
        "--layers: expected OUTxIN items separated by commas (e.g. 4096x4096), got '4096x40a6'" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_layers_parse_in_order() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_layer import parse_layers
    finally:
        sys.path.pop(0)
    assert parse_layers("576x576, 1536x576") == [(576, 576), (1536, 576)]
