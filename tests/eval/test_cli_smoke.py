"""End to end on CPU: the command generates with a tiny random Llama and writes ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from axolotl_soka.eval import cli

RECORD_KEYS = {"id", "prompt", "completion", "extracted", "reference", "correct", "error"}


def _run(argv: list[str], output: Path) -> dict:
    assert (
        cli.main(
            [*argv, "--limit", "2", "--batch-size", "2", "--max-new-tokens", "8", "--output", str(output)]
        )
        == 0
    )
    return json.loads(output.read_text())


def _check(results: dict, task: str) -> None:
    summary, records = results["summary"], results["records"]
    assert summary["task"] == task
    assert summary["status"] == "complete"
    assert summary["total"] == 2 == len(records)
    assert isinstance(summary["accuracy"], float) and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["correct"] == sum(r["correct"] for r in records)
    assert summary["elapsed_s"] >= 0
    assert summary["generation"]["max_new_tokens"] == 8
    for record in records:
        assert RECORD_KEYS <= record.keys()
        assert isinstance(record["completion"], str)


@pytest.mark.parametrize("task", ["gsm8k", "math", "mbpp"])
def test_cli_end_to_end(task: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    results = _run(
        ["--task", task, "--base-model", str(tiny_model_dir), "--adapter", "none"], tmp_path / "r.json"
    )
    _check(results, task)
    assert results["summary"]["adapter"] is None


def test_cli_with_lora_adapter_from_axolotl_yaml(
    tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "axolotl.yml"
    cfg.write_text(f"base_model: {tiny_model_dir}\nadapter: lora\noutput_dir: {tiny_lora_dir}\n")
    results = _run(["--task", "gsm8k", "--config", str(cfg)], tmp_path / "r.json")
    _check(results, "gsm8k")
    assert results["summary"]["adapter"] == str(tiny_lora_dir)
    assert results["summary"]["adapter_type"] == "LORA"


def test_cli_with_soka_adapter(tiny_model_dir: Path, tiny_soka_dir: Path, tmp_path: Path) -> None:
    argv = ["--task", "mbpp", "--base-model", str(tiny_model_dir), "--adapter", str(tiny_soka_dir)]
    results = _run(argv, tmp_path / "r.json")
    _check(results, "mbpp")
    assert results["summary"]["adapter_type"] == "SOKA"


def test_interrupt_keeps_finished_work(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the first batch: the first batch is in results.json, marked interrupted."""
    from axolotl_soka.eval import results as results_mod

    calls = {"n": 0}
    original = results_mod.ResultWriter.write

    def write_then_interrupt(self: results_mod.ResultWriter, status: str = "running") -> dict:
        summary = original(self, status)
        calls["n"] += 1
        if status == "running" and calls["n"] == 1:
            raise KeyboardInterrupt
        return summary

    monkeypatch.setattr(results_mod.ResultWriter, "write", write_then_interrupt)
    output = tmp_path / "r.json"
    argv = ["--task", "gsm8k", "--base-model", str(tiny_model_dir), "--limit", "4", "--batch-size", "2"]
    with pytest.raises(KeyboardInterrupt):
        cli.main([*argv, "--max-new-tokens", "4", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["summary"]["status"] == "interrupted"
    assert saved["summary"]["total"] == 2 == len(saved["records"])
