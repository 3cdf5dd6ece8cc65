"""``bench_step.py`` runs end to end on a tiny model and prints one row per run; bad options stop early."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "benchmarks" / "bench_step.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_prints_a_row_per_run_with_lora_as_the_reference(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "model", hidden_size=64, intermediate_size=128)
    cmd = [sys.executable, SCRIPT, "--model", str(model_dir), "--methods", "soka", "--ranks", "2,4"]
    proc = subprocess.run([*cmd, "--rounds", "2"], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| (lora|soka)-r\d ", line)]
    assert [row.split(" | ")[0] for row in rows] == ["| lora-r2", "| soka-r2", "| lora-r4", "| soka-r4"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        trainable, seconds, mib = int(cells[1].replace(",", "")), float(cells[2]), float(cells[5])
        assert trainable > 0 and mib > 0
        # the step time is whatever the host manages, printed to 1 ms: it may print as 0.000 (a fast host)
        assert math.isfinite(seconds) and seconds >= 0
        # the median of the per-round ratios to LoRA lies within their printed range, at any speed
        low, high = (float(x.rstrip("×")) for x in cells[4].split(" … "))
        assert low <= float(cells[3].rstrip("×")) <= high
    assert rows[0].split(" | ")[3] == "1.00×"  # LoRA against itself


def test_an_unknown_method_is_named_with_the_allowed_ones() -> None:
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--methods", "lora,dora"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "--methods: unknown dora; allowed: lora, pissa, soka" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dense_adds_a_dense_forward_run_of_each_soka_method(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "model", hidden_size=64, intermediate_size=128)
    cmd = [sys.executable, SCRIPT, "--model", str(model_dir), "--methods", "soka", "--ranks", "2", "--dense"]
    proc = subprocess.run([*cmd, "--rounds", "2"], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| (lora|soka)[+a-z]*-r\d ", line)]
    assert [row.split(" | ")[0] for row in rows] == ["| lora-r2", "| soka-r2", "| soka+dense-r2"]
    trainable = [row.split(" | ")[1] for row in rows]
    assert trainable[1] == trainable[2]
