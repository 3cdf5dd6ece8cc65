"""End to end through Axolotl's own entry points on a tiny random Llama (CPU): train, resume, merge, inference."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import base_config, write_config
from safetensors import safe_open

pytestmark = pytest.mark.slow


def train(config_path: Path, **overrides):
    """What ``python -m axolotl.cli.train CONFIG --key=value`` does, in this process."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train

    cfg = load_cfg(str(config_path), **overrides)
    do_train(cfg, TrainerCliArgs())
    return cfg


def losses(trainer_state: Path) -> dict[int, float]:
    history = json.loads(trainer_state.read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def run(tiny_model_dir, gsm8k_file, tmp_path_factory) -> dict:
    """One uninterrupted 6-step run with checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("soka-run")
    cfg = base_config(tiny_model_dir, gsm8k_file, root, skip_prepare_dataset=True, use_tensorboard=True)
    path = write_config(cfg, root / "config.yml")
    train(path)
    return {"root": root, "config": path, "cfg": cfg, "out": Path(cfg["output_dir"])}


def test_train_saves_a_small_adapter_and_report(run):
    out = run["out"]
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SOKA" and saved["resolved"] is True
    assert len(saved["rank_pattern"]) == 14  # 2 layers x 7 projections, no lm_head
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("soka_" in k for k in keys)
    assert not any(k.endswith("base_layer.weight") for k in keys)

    steps = losses(out / "checkpoint-6" / "trainer_state.json")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in steps.values())
    assert steps[6] < steps[1]

    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    stats = next(h for h in history if "soka/trainable_params" in h)
    report = json.loads((out / "soka_rank_report.json").read_text())
    assert stats["soka/trainable_params"] == report["totals"]["trainable_params"] > 0
    assert stats["soka/total_terms"] == report["totals"]["total_terms"]
    assert (out / "soka_rank_report.png").stat().st_size > 1000


def test_ranks_and_parameters_reach_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run["out"].rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for name in ("trainable_params", "total_terms", "mean_rank", "mean_rank/q_proj"):
        assert f"train/soka/{name}" in scalars
    assert acc.Scalars("train/soka/trainable_params")[0].value > 0
    assert any("soka/rank_report" in tag for tag in acc.Tags()["tensors"])  # the table, as text


def test_resume_reproduces_the_uninterrupted_losses(run, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(run["out"] / "checkpoint-3", out / "checkpoint-3")
    cfg = dict(run["cfg"], output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-3"))
    train(write_config(cfg, tmp_path / "resume.yml"))
    resumed = losses(out / "checkpoint-6" / "trainer_state.json")
    reference = losses(run["out"] / "checkpoint-6" / "trainer_state.json")
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert not (out / "soka_rank_report.json").exists()  # loaded from the checkpoint: no new decomposition


def test_merge_writes_a_plain_model_with_the_same_logits(run, tiny_model_dir, tmp_path):
    from axolotl.cli.merge_lora import do_cli as merge_cli
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merge_cli(config=str(run["config"]))
    merged = run["out"] / "merged"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        merged_keys = set(f.keys())
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    assert merged_keys == base_keys

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(run["out"])).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits

    # A fresh interpreter that never imports axolotl_soka or peft-side SoKA code loads the merged model.
    logits_file = tmp_path / "logits.pt"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(merged)!r}, dtype=torch.float32).eval()
        assert "axolotl_soka" not in sys.modules
        assert all(type(m).__module__.startswith(("torch", "transformers")) for m in model.modules())
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({ids.tolist()})).logits, {str(logits_file)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(logits_file), expected, atol=1e-4, rtol=1e-4)


def test_inference_with_lora_model_dir(run, monkeypatch, capsys):
    from axolotl.cli.args import InferenceCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.inference import do_inference

    cfg = load_cfg(str(run["config"]), lora_model_dir=str(run["out"]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Question: Tom has 3 apples.\nAnswer: "))
    torch.manual_seed(0)
    do_inference(cfg=cfg, cli_args=InferenceCliArgs())
    printed = capsys.readouterr().out
    assert any(block.strip().startswith("<s> Question") and "Tom has 3 apples" in block
               for block in printed.split("=" * 80))  # fmt: skip


def test_gradient_calibrated_auto_shape_budget_run(tiny_model_dir, gsm8k_file, tmp_path):
    """soka_init: gradient + soka_factor_shape: auto + soka_param_budget through the YAML, 3 training steps."""
    cfg = base_config(
        tiny_model_dir, gsm8k_file, tmp_path, max_steps=3, save_steps=3, soka_init="gradient",
        soka_factor_shape="auto", soka_param_budget=3000, soka_calibration_batches=2, soka_target_modules=["q_proj", "down_proj"],
        soka_max_rank=64, soka_energy_threshold=1.0, soka_elbow_mode="none",  # the budget alone decides
    )  # fmt: skip
    train(write_config(cfg, tmp_path / "config.yml"))
    out = Path(cfg["output_dir"])
    report = json.loads((out / "soka_rank_report.json").read_text())
    modules = report["modules"]
    assert len(modules) == 4 and all(m["source"] == "gradient" for m in modules)
    assert all(m["shape_candidates"] and m["shape_candidates"][0]["shape"] == m["shape"] for m in modules)
    # the greedy allocation stops less than one term short of the budget
    largest_term = max(m * n + p * q + 1 for m, n, p, q in (mod["shape"] for mod in modules))
    assert 3000 - largest_term < report["totals"]["trainable_params"] <= 3000
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["init"] == "gradient" and saved["init_source"] == "gradient" and saved["resolved"] is True
    assert {tuple(v) for v in saved["shape_pattern"].values()} == {tuple(m["shape"]) for m in modules}
    steps = losses(out / "checkpoint-3" / "trainer_state.json")
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(v) for v in steps.values())
