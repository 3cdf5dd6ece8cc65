"""Axolotl's own ``deepspeed:`` ZeRO-3 trainer on two CPU processes (gloo): train, resume, merge; LoRA as a
control.

Each run is ``accelerate launch --multi_gpu --num_processes 2 cpu_launch.py axolotl.cli.train CONFIG``:
unchanged Axolotl, accelerate and DeepSpeed, with only the communication backend chosen for a machine
without GPUs (see ``cpu_launch.py``). The DeepSpeed config is the shipped
``example_configs/deepspeed/zero3_bf16.json`` with the two settings a CPU run needs
(:func:`cpu_zero3_config`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import base_config, write_config
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("cpu_launch.py")
SHIPPED_ZERO3 = REPO / "example_configs" / "deepspeed" / "zero3_bf16.json"
MODULES = 14  # 2 decoder layers x 7 projections


def cpu_zero3_config() -> dict:
    """The shipped ZeRO-3 config with the two settings that differ on a CPU: ``bf16.enabled: auto`` (the CPU
    runs train in fp32, and DeepSpeed must follow the YAML's ``bf16:``) and ``stage3_allgather_sequential``
    (gloo's coalesced all-gather does not wait for all of its transfers; see
    ``axolotl_soka.tuner.distributed.coalesced_gather_is_safe``)."""
    config = json.loads(SHIPPED_ZERO3.read_text())
    config["bf16"]["enabled"] = "auto"
    config["zero_optimization"]["stage3_allgather_sequential"] = True
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without distributed settings, on CPU processes (GPUs hidden), offline."""
    drop = ("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_", "SOKA_RECORD_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(TRANSFORMERS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled", **extra)
    return env


def launch(module: str, config: Path, processes: int, **env: str) -> subprocess.CompletedProcess:
    """Run an Axolotl CLI ``module`` on ``config`` with ``processes`` CPU processes; assert it succeeded."""
    if processes > 1:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), str(LAUNCH), module, str(config),
        ]  # fmt: skip
    else:
        cmd = [sys.executable, str(LAUNCH), module, str(config)]
        env = dict(env, MASTER_PORT=str(_free_port()))
    proc = subprocess.run(
        cmd, env=_env(**env), capture_output=True, text=True, timeout=900, cwd=config.parent
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(trainer_state: Path) -> dict[int, float]:
    history = json.loads(trainer_state.read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def zero3_config(model_dir: Path, data: Path, root: Path, **overrides) -> dict:
    """The plugin tests' CPU config (six steps, checkpoints at 3 and 6) under ZeRO-3, its JSON in ``root``."""
    ds_path = root / "zero3_cpu.json"
    ds_path.write_text(json.dumps(cpu_zero3_config(), indent=2))
    return base_config(model_dir, data, root, deepspeed=str(ds_path), **overrides)


def train_zero3(cfg: dict, root: Path, name: str, record: bool = False) -> tuple[Path, Path]:
    """Train ``cfg`` on two processes; return the config path and the decision-record directory."""
    records = root / f"{name}-records"
    records.mkdir()
    path = write_config(cfg, root / f"{name}.yml")
    launch("axolotl.cli.train", path, 2, **({"SOKA_RECORD_DIR": str(records)} if record else {}))
    return path, records


@pytest.fixture(scope="module")
def soka_run(tiny_model_dir, gsm8k_file, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zero3-soka")
    cfg = zero3_config(tiny_model_dir, gsm8k_file, root)
    path, records = train_zero3(cfg, root, "soka", record=True)
    return {"root": root, "cfg": cfg, "config": path, "records": records, "out": Path(cfg["output_dir"])}


def test_zero3_run_trains_on_two_processes_and_saves_only_the_adapter(soka_run):
    out = soka_run["out"]
    steps = losses(out / "checkpoint-6" / "trainer_state.json")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in steps.values()) and steps[6] < steps[1]
    # two processes, and DeepSpeed's ZeRO checkpoint with one partition per process
    assert {p.name for p in (out / "checkpoint-6").glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    engine = {p.name for p in (out / "checkpoint-6" / "global_step6").iterdir()}
    assert any("zero_pp_rank_0" in n for n in engine) and any("zero_pp_rank_1" in n for n in engine), engine

    saved = json.loads((out / "adapter_config.json").read_text())
    assert (
        saved["peft_type"] == "SOKA" and saved["resolved"] is True and len(saved["rank_pattern"]) == MODULES
    )
    assert not list(out.glob("model*.safetensors")) and not list(out.glob("pytorch_model*.bin"))
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("soka_" in k for k in keys)
    assert all(
        f.get_tensor(k).numel() > 0
        for f in [safe_open(str(out / "adapter_model.safetensors"), "pt")]
        for k in keys
    )


def test_each_module_is_decomposed_once_across_the_processes(soka_run):
    per_rank = [(soka_run["records"] / f"decisions-rank{r}.txt").read_text().split() for r in (0, 1)]
    names = per_rank[0] + per_rank[1]
    assert all(per_rank), per_rank  # the work was shared
    assert len(names) == len(set(names)) == MODULES
    saved = json.loads((soka_run["out"] / "adapter_config.json").read_text())
    assert {n.removeprefix("model.") for n in names} == {
        n.removeprefix("model.") for n in saved["rank_pattern"]
    }


def test_initial_factors_equal_a_single_process_init(soka_run, tiny_model_dir):
    """The adapter stores its initial factors (``soka_A0``/``soka_B0``): the ZeRO-3 init, on gathered weights
    spread over two processes, equals a plain ``get_peft_model`` on one process with the YAML's config."""
    from axolotl.cli.config import load_cfg
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_soka.plugin.plugin import soka_config_from_cfg

    single_cfg = {k: v for k, v in soka_run["cfg"].items() if k != "deepspeed"}
    config = soka_config_from_cfg(load_cfg(str(write_config(single_cfg, soka_run["root"] / "single.yml"))))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): the same BLAS and LAPACK paths
    try:
        state = get_peft_model(copy.deepcopy(base), config).state_dict()
    finally:
        torch.set_num_threads(threads)
    expected = {k.replace(".default", ""): v for k, v in state.items() if "soka_A0" in k or "soka_B0" in k}
    saved = load_file(str(soka_run["out"] / "adapter_model.safetensors"))
    initial = {k: v for k, v in saved.items() if "soka_A0" in k or "soka_B0" in k}
    assert len(initial) == 2 * MODULES
    for key, value in initial.items():
        match = [v for k, v in expected.items() if k.endswith(key.removeprefix("base_model.model."))]
        assert len(match) == 1, key
        assert torch.equal(value, match[0]), key


@pytest.mark.slow
def test_resume_from_a_zero3_checkpoint_gives_the_uninterrupted_losses(soka_run):
    root = soka_run["root"]
    out = root / "resumed"
    out.mkdir()
    shutil.copytree(soka_run["out"] / "checkpoint-3", out / "checkpoint-3")
    cfg = dict(soka_run["cfg"], output_dir=str(out), resume_from_checkpoint=str(out / "checkpoint-3"))
    _, records = train_zero3(cfg, root, "resume", record=True)
    resumed = losses(out / "checkpoint-6" / "trainer_state.json")
    reference = losses(soka_run["out"] / "checkpoint-6" / "trainer_state.json")
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert not list(records.iterdir())  # loaded from the checkpoint: nothing decomposed again


@pytest.mark.slow
def test_merge_after_a_zero3_run_needs_no_flag(soka_run, tiny_model_dir, tmp_path):
    """``axolotl.cli.merge_lora CONFIG`` on the training YAML (``deepspeed:`` still set) writes a plain model
    that a process without ``axolotl_soka`` loads, with the adapter's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    launch("axolotl.cli.merge_lora", soka_run["config"], 1)
    merged = soka_run["out"] / "merged"
    with (
        safe_open(str(merged / "model.safetensors"), "pt") as f,
        safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as g,
    ):
        assert set(f.keys()) == set(g.keys())

    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(soka_run["out"])).eval()(input_ids=ids).logits
    logits_file = tmp_path / "logits.pt"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(merged)!r}, dtype=torch.float32).eval()
        assert "axolotl_soka" not in sys.modules
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({ids.tolist()})).logits, {str(logits_file)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=_env())
    torch.testing.assert_close(torch.load(logits_file), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_lora_control_under_the_same_zero3_run(tiny_model_dir, gsm8k_file, tmp_path):
    cfg = zero3_config(tiny_model_dir, gsm8k_file, tmp_path, adapter="lora", lora_r=4, lora_alpha=8)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("soka_") and k != "plugins"}
    # Axolotl turns on its Triton LoRA kernels by default, which need a GPU
    cfg.update(
        lora_target_linear=True,
        save_steps=6,
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
    )
    train_zero3(cfg, tmp_path, "lora")
    out = Path(cfg["output_dir"])
    steps = losses(out / "checkpoint-6" / "trainer_state.json")
    assert all(math.isfinite(v) for v in steps.values()) and steps[6] < steps[1]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not list(out.glob("model*.safetensors"))


def test_shipped_zero3_config_fits_a_gpu_run_and_needs_the_cpu_settings_on_a_cpu(tmp_path):
    """What transformers checks when the Trainer starts DeepSpeed: the shipped JSON agrees with a bf16 GPU
    run's arguments (its ``auto`` values filled from them); a fp32 CPU run's ``bf16: false`` contradicts its
    ``bf16.enabled: true``, which the CPU variant leaves to the YAML."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    def process(config: dict, bf16: bool) -> dict:
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=4,
            max_grad_norm=1.0, bf16=bf16, use_cpu=not torch.cuda.is_available(),
        )  # fmt: skip
        ds = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
        ds.trainer_config_process(args)
        ds.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=4096)), 100)
        return ds.config

    shipped = json.loads(SHIPPED_ZERO3.read_text())
    gpu = process(shipped, bf16=True)
    assert gpu["train_micro_batch_size_per_gpu"] == 4 and gpu["gradient_clipping"] == 1.0
    assert (
        gpu["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 4096
    )  # filled from the model
    assert (
        gpu["zero_optimization"]["stage"] == 3
        and gpu["zero_optimization"]["gather_16bit_weights_on_model_save"]
    )
    with pytest.raises(ValueError, match="bf16"):
        process(shipped, bf16=False)
    assert process(cpu_zero3_config(), bf16=False)["bf16"]["enabled"] is False
    differ = {k for k in shipped if shipped[k] != cpu_zero3_config()[k]}
    assert differ == {"bf16", "zero_optimization"}
