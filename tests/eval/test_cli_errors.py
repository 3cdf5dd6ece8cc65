"""Bad input is reported (naming the flag and the allowed values) before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from axolotl_soka.eval import cli, model


@pytest.fixture(autouse=True)
def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was loaded despite bad input")

    monkeypatch.setattr(model, "load", fail)


@pytest.fixture()
def base_dir(tmp_path: Path) -> Path:
    """A directory that passes as a base model path (nothing is loaded in these tests)."""
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_unknown_task(capsys: pytest.CaptureFixture[str], base_dir: Path) -> None:
    err = _error(capsys, ["--task", "hellaswag", "--base-model", str(base_dir)])
    assert "--task" in err and "gsm8k, math, mbpp" in err


def test_missing_data_file(capsys: pytest.CaptureFixture[str], base_dir: Path, tmp_path: Path) -> None:
    err = _error(
        capsys, ["--task", "gsm8k", "--base-model", str(base_dir), "--data", str(tmp_path / "no.jsonl")]
    )
    assert "--data" in err and "not found" in err


def test_data_file_with_wrong_keys(
    capsys: pytest.CaptureFixture[str], base_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"q": "x"}) + "\n")
    err = _error(capsys, ["--task", "gsm8k", "--base-model", str(base_dir), "--data", str(data)])
    assert "--data" in err and "'question'" in err


@pytest.mark.parametrize("flag", ["--limit", "--batch-size", "--max-new-tokens", "--workers"])
def test_counts_below_one(capsys: pytest.CaptureFixture[str], base_dir: Path, flag: str) -> None:
    err = _error(capsys, ["--task", "gsm8k", "--base-model", str(base_dir), flag, "0"])
    assert flag in err and ">= 1" in err


def test_missing_adapter_dir(capsys: pytest.CaptureFixture[str], base_dir: Path, tmp_path: Path) -> None:
    err = _error(
        capsys, ["--task", "gsm8k", "--base-model", str(base_dir), "--adapter", str(tmp_path / "nope")]
    )
    assert "--adapter" in err and "not found" in err and "none" in err


def test_adapter_dir_without_adapter_config(capsys: pytest.CaptureFixture[str], base_dir: Path) -> None:
    err = _error(capsys, ["--task", "gsm8k", "--base-model", str(base_dir), "--adapter", str(base_dir)])
    assert "--adapter" in err and "adapter_config.json" in err


def test_missing_base_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _error(capsys, ["--task", "gsm8k", "--base-model", str(tmp_path / "missing")])
    assert "--base-model" in err


def test_needs_config_or_base_model(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["--task", "gsm8k"])
    assert "--config" in err and "--base-model" in err


def test_config_without_base_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "axolotl.yml"
    cfg.write_text("output_dir: ./out\n")
    err = _error(capsys, ["--task", "gsm8k", "--config", str(cfg)])
    assert "--config" in err and "base_model" in err


def test_config_adapter_not_trained_yet(
    capsys: pytest.CaptureFixture[str], base_dir: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "axolotl.yml"
    cfg.write_text(f"base_model: {base_dir}\noutput_dir: {tmp_path / 'out'}\n")
    err = _error(capsys, ["--task", "gsm8k", "--config", str(cfg)])
    assert "--config" in err and "--adapter none" in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _error(capsys, ["--task", "gsm8k", "--config", str(tmp_path / "none.yml")])
    assert "--config" in err and "not found" in err


@pytest.mark.parametrize(
    ("flag", "value"), [("--dtype", "int3"), ("--backend", "tgi"), ("--mbpp-split", "dev")]
)
def test_unknown_choices(capsys: pytest.CaptureFixture[str], base_dir: Path, flag: str, value: str) -> None:
    err = _error(capsys, ["--task", "mbpp", "--base-model", str(base_dir), flag, value])
    assert flag in err and "allowed" in err


def test_missing_gguf_file(capsys: pytest.CaptureFixture[str], base_dir: Path) -> None:
    err = _error(capsys, ["--task", "gsm8k", "--base-model", str(base_dir), "--gguf-file", "m.gguf"])
    assert "--gguf-file" in err


def test_module_entry_point_reports_errors() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "axolotl_soka.eval", "--task", "nope", "--base-model", "x"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert done.returncode == 2
    assert "--task" in done.stderr


def test_unreachable_hub_dataset(capsys: pytest.CaptureFixture[str], base_dir: Path) -> None:
    pytest.importorskip("datasets")
    err = _error(
        capsys, ["--task", "gsm8k", "--base-model", str(base_dir), "--data", "nobody/no-such-dataset"]
    )
    assert "--data" in err and "could not load" in err


@pytest.mark.parametrize(("task", "text"), [("gsm8k", ""), ("mbpp", "\n\n"), ("math", "[]")])
def test_empty_data_file(
    capsys: pytest.CaptureFixture[str], base_dir: Path, tmp_path: Path, task: str, text: str
) -> None:
    data = tmp_path / ("empty.json" if text == "[]" else "empty.jsonl")
    data.write_text(text)
    err = _error(capsys, ["--task", task, "--base-model", str(base_dir), "--data", str(data)])
    assert "--data" in err and "has no records" in err and str(data) in err


def test_output_is_an_existing_directory(
    capsys: pytest.CaptureFixture[str], base_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    err = _error(capsys, ["--task", "gsm8k", "--base-model", str(base_dir), "--output", str(out)])
    assert "--output" in err and "existing directory" in err and str(out / "results_gsm8k.json") in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_timeout_must_be_finite_and_positive(
    capsys: pytest.CaptureFixture[str], base_dir: Path, value: str
) -> None:
    # ``--timeout=VALUE``: argparse would take a separate ``-inf`` for an option
    err = _error(capsys, ["--task", "mbpp", "--base-model", str(base_dir), f"--timeout={value}"])
    assert "--timeout" in err and "finite number of seconds > 0" in err
