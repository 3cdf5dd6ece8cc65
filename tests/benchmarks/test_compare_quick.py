"""The head-to-head benchmark's quick mode runs end to end on a tiny model, so the script cannot rot; a run in a
fresh interpreter (how the measured sizes start runs) gives the same losses as the quick size's forked runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of ``compare.py --size quick`` on a tiny model (and its resumed second invocation)."""
    tmp_path = tmp_path_factory.mktemp("compare")
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
    # a second invocation resumes: every run is already done, nothing is retrained
    again = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (out / "resumed.log").write_text(again.stdout)
    return out


def test_quick_mode_runs_every_method_and_writes_the_report(quick_out: Path) -> None:
    out = quick_out
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

    progress = [line for line in (out / "resumed.log").read_text().splitlines() if line.startswith("[")]
    # grid stage (soka-grad-auto has none: it takes soka-grad's rate), then final stage (r4 runs reused)
    assert len(progress) == 7 + 9
    assert all(line.endswith("(done)") for line in progress)


def test_a_fresh_interpreter_run_equals_the_forked_run(quick_out: Path, tmp_path: Path) -> None:
    """The measured sizes' launcher: same losses and validation loss as the fork server's run of the same
    config, and a higher peak RSS (a whole process's libraries, not only the pages the run touched)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare
    from headtohead.training import RunConfig

    forked = json.loads(next((quick_out / "runs").glob("soka-r4-lr*.json")).read_text())
    result = tmp_path / "fresh.json"
    compare.launch(RunConfig(**forked["config"]), result, processes=None)
    fresh = json.loads(result.read_text())
    assert fresh["name"] == "soka-r4" and fresh["trainable"] == forked["trainable"]
    assert fresh["losses"] == forked["losses"] and fresh["grad_norms"] == forked["grad_norms"]
    assert fresh["val_loss"] == forked["val_loss"] and fresh["accuracy"] == forked["accuracy"]
    assert fresh["peak_mib"] > forked["peak_mib"] + 50


def test_a_failed_run_stops_the_benchmark_with_its_name(quick_out: Path, tmp_path: Path) -> None:
    """A run whose process fails (here: its model folder is gone) stops the benchmark with a message naming the
    run and its exit code, and leaves no result behind."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare
    from headtohead.training import RunConfig

    config = json.loads(next((quick_out / "runs").glob("lora-r4-lr*.json")).read_text())["config"]
    bad = RunConfig(**{**config, "model_dir": str(tmp_path / "no-such-model")})
    result = tmp_path / "failed.json"
    with pytest.raises(
        SystemExit, match=r"^run lora-r4-lr[0-9.e-]+-s0 failed \(exit code 1\); see its output above$"
    ):
        compare.launch(bad, result, processes=None)
    assert not result.exists()
