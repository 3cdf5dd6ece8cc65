"""The head-to-head benchmark's quick mode runs end to end on a tiny model, so the script cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


def test_quick_mode_runs_every_method_and_writes_the_report(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "model", hidden_size=64, intermediate_size=128)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "compare.py"),
        "--size",
        "quick",
        "--model",
        str(model_dir),
    ]
    proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    names = {r["name"] for r in runs.values()}
    assert names == {
        "lora-r4", "pissa-r4", "lokr-r4", "soka-r4", "soka-zero-r4", "soka-lora-shape-r4", "soka-r4@0.75x",
        "soka-grad-r4", "soka-grad-auto-r4",
    }  # fmt: skip
    for run in runs.values():
        assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
        assert math.isfinite(run["val_loss"]) and 0.0 <= run["accuracy"] <= 1.0
        assert run["trainable"] > 0 and run["seconds_per_step"] > 0
    lora = next(r for r in runs.values() if r["name"] == "lora-r4")
    assert lora["trainable"] == lora["budget"]
    for name in (
        "soka-r4",
        "soka-zero-r4",
        "soka-lora-shape-r4",
        "soka-r4@0.75x",
        "soka-grad-r4",
        "soka-grad-auto-r4",
    ):
        run = next(r for r in runs.values() if r["name"] == name)
        assert run["trainable"] <= run["budget"], name  # SoKA's param_budget is an upper bound
    assert next(r for r in runs.values() if r["name"] == "soka-r4@0.75x")["budget"] == round(
        0.75 * lora["budget"]
    )

    report = (out / "report.md").read_text()
    assert "| soka-r4 |" in report and "Learning-rate grid" in report
    for png in ("compare-out-losses.png", "compare-out-grad-norms.png", "compare-out-vs-params.png"):
        assert (out / png).stat().st_size > 1000

    # a second invocation resumes: every run is already done, nothing is retrained
    again = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    progress = [line for line in again.stdout.splitlines() if line.startswith("[")]
    # grid stage (soka-grad-auto has none: it takes soka-grad's rate), then final stage (r4 runs reused)
    assert again.returncode == 0 and len(progress) == 7 + 9
    assert all(line.endswith("(done)") for line in progress)
