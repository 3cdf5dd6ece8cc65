"""DeepSpeed ZeRO-3 on the CPU: 2 processes with gloo, SoKA initialised on partitioned weights.

The worker (``zero3_worker.py``) loads a tiny Llama under ZeRO-3 and runs the same ``get_peft_model`` path
as the Axolotl plugin; here we check that its ranks, factors and residual weights equal the single-process
result, that training steps ran, and that the adapter it saved (gathering only SoKA parameters) reproduces
the trained model's outputs on the original model.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from axolotl_soka import SokaConfig, SokaLayer, calibrate_gradients  # noqa: E402

WORKER = Path(__file__).with_name("zero3_worker.py")
sys.path.insert(0, str(WORKER.parent))
from zero3_worker import GRAD_SOKA, SOKA, calibration_batches  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("zero3")
    model_dir, out_dir = root / "model", root / "out"
    out_dir.mkdir()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, attention_bias=True,  # biased q/k/v/o (as Qwen2's q/k/v): SoKA flattens their input
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(WORKER), str(model_dir), str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return model_dir, out_dir


def _single_process(model_dir: Path) -> tuple[LlamaForCausalLM, PeftModel]:
    original = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return original, get_peft_model(copy.deepcopy(original), SokaConfig(**SOKA))


def test_weights_were_partitioned_and_training_ran(zero3_run: tuple[Path, Path]) -> None:
    _, out_dir = zero3_run
    for rank in (0, 1):
        info = json.loads((out_dir / f"rank{rank}.json").read_text())
        assert info["partitioned"], "the worker's base weights were not ZeRO-3 partitioned"
        assert len(info["losses"]) == 4 and all(0.0 < loss < 20.0 for loss in info["losses"])


def test_deepspeed_hooks_keep_the_in_place_and_flattened_paths(zero3_run: tuple[Path, Path]) -> None:
    """The layers recognise the fetch/release hooks DeepSpeed registers on the base layers: every training
    forward adds in place, and every biased layer (q/k/v/o here, 3-d input) runs on the flattened input."""
    _, out_dir = zero3_run
    for rank in (0, 1):
        paths = json.loads((out_dir / f"rank{rank}.json").read_text())["paths"]
        calls = 4 * 2 * 7  # 4 steps × 2 decoder layers × 7 adapted modules (4 of them biased)
        assert paths == {
            "biased_flattened": 4 * 2 * 4,
            "biased_not_flattened": 0,
            "in_place": calls,
            "out_of_place": 0,
        }


def test_zero3_init_equals_single_process(zero3_run: tuple[Path, Path]) -> None:
    model_dir, out_dir = zero3_run
    record = torch.load(out_dir / "init.pt")
    _, reference = _single_process(model_dir)
    layers = {name: m for name, m in reference.named_modules() if isinstance(m, SokaLayer)}
    assert set(layers) == set(record) and len(layers) == 14
    for name, layer in layers.items():
        got = record[name]
        assert got["rank"] == layer.r["default"]
        torch.testing.assert_close(got["A"], layer.soka_A["default"].detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(got["B"], layer.soka_B["default"].detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(got["s"], layer.soka_s["default"].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["residual"], layer.get_base_layer().weight.detach(), rtol=0, atol=1e-6)


def test_saved_adapter_reproduces_trained_zero3_model(zero3_run: tuple[Path, Path]) -> None:
    """On one process and on a fresh ZeRO-3 model (the resume path, no SVD allowed) alike."""
    model_dir, out_dir = zero3_run
    trained = torch.load(out_dir / "trained.pt")
    saved = json.loads((out_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SOKA" and saved["resolved"] is True
    original = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = PeftModel.from_pretrained(original, out_dir / "adapter").eval()
    with torch.no_grad():
        logits = loaded(input_ids=trained["probe"]).logits
    scale = trained["logits"].abs().max()
    assert (logits - trained["logits"]).abs().max() <= 1e-5 * scale
    resumed = torch.load(out_dir / "resumed.pt")["logits"]
    assert (resumed - trained["logits"]).abs().max() <= 1e-5 * scale, (
        "reloading under ZeRO-3 changed the outputs"
    )
    initial = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = initial(input_ids=trained["probe"]).logits
    assert (before - trained["logits"]).abs().max() > 1e-3, "training through DeepSpeed changed nothing"


def test_gradient_calibration_under_zero3_equals_single_process(zero3_run: tuple[Path, Path]) -> None:
    """Each process calibrates on its own 2 batches of the partitioned model; together they equal one process
    on all 4, each module's gradient held by its owner (target i on process i mod 2), and the init matches."""
    model_dir, out_dir = zero3_run
    original = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = copy.deepcopy(original)
    config = SokaConfig(**GRAD_SOKA)
    reference = calibrate_gradients(model, config, calibration_batches(), progress=False)
    parts = [torch.load(out_dir / f"grads{rank}.pt") for rank in (0, 1)]
    assert all(part["partitioned_after"] for part in parts), "calibration left weights gathered"
    assert all(part["batches"] == 4 for part in parts)
    names = [name for name, _ in original.named_modules() if name in reference.gradients]  # target order
    assert len(names) == len(reference.gradients) == 6
    for rank, part in enumerate(parts):
        assert set(part["gradients"]) == set(names[rank::2])
        for name, grad in part["gradients"].items():
            torch.testing.assert_close(grad, reference.gradients[name], rtol=1e-4, atol=1e-6)

    record = torch.load(out_dir / "grad_init.pt")
    peft_model = get_peft_model(model, config)
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, SokaLayer)}
    assert set(layers) == set(record)
    for name, layer in layers.items():
        got = record[name]
        assert got["rank"] == layer.r["default"] == 2
        for key, ours in (("A", layer.soka_A), ("B", layer.soka_B)):
            # same directions up to each term's sign (the gradient sums differ in rounding order)
            cos = torch.nn.functional.cosine_similarity(
                got[key].flatten(1), ours["default"].detach().flatten(1)
            )
            assert (cos.abs() > 1 - 1e-4).all(), (name, key, cos)
        torch.testing.assert_close(got["residual"], layer.get_base_layer().weight.detach(), rtol=0, atol=1e-5)
    for rank in (0, 1):
        losses = json.loads((out_dir / f"grad_losses{rank}.json").read_text())
        assert len(losses) == 2 and all(0.0 < loss < 20.0 for loss in losses)
