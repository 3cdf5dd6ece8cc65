"""The MetaMathQA experiment folder is in PEFT's layout and loads as a SoKA config, and the wrapper runs PEFT's
harness script with SoKA registered (here a stand-in ``run.py`` that builds the experiment's adapter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "benchmarks" / "metamathqa" / "run_with_soka.py"
EXPERIMENTS = REPO / "benchmarks" / "metamathqa" / "experiments" / "soka"

# what PEFT's run.py does with an experiment folder, in short: load its adapter config through PEFT's own
# registry, build the adapter on a model, and report the trainable count
STAND_IN = """
import json, sys
import torch
from peft import PeftConfig, get_peft_model
from utils_stub import TinyLlama

path = sys.argv[-1]
config = PeftConfig.from_pretrained(path)
params = json.load(open(path + "/training_params.json"))
model = get_peft_model(TinyLlama(), config)
trainable, _ = model.get_nb_trainable_parameters()
print(json.dumps({"type": type(config).__name__, "trainable": trainable, "lr": params["optimizer_kwargs"]["lr"]}))
"""
STUB = """
from torch import nn

class TinyLlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(64, 64), "v_proj": nn.Linear(64, 32)})
                                    for _ in range(2))

    def forward(self, x):
        return sum(layer["q_proj"](x).sum() + layer["v_proj"](x).sum() for layer in self.layers)
"""


def test_the_experiment_folders_are_in_peft_layout_and_load_as_soka() -> None:
    from peft import PeftConfig

    import axolotl_soka

    folders = sorted(p for p in EXPERIMENTS.iterdir() if p.is_dir())
    assert folders
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "training_params.json"]
        config = PeftConfig.from_pretrained(str(folder))
        assert isinstance(config, axolotl_soka.SokaConfig) and config.init == "kpsvd"
        lr = json.loads((folder / "training_params.json").read_text())["optimizer_kwargs"]["lr"]
        assert f"lr{lr:g}" in folder.name


def test_the_wrapper_runs_the_harness_with_soka_registered(tmp_path: Path) -> None:
    harness = tmp_path / "MetaMathQA"
    (harness / "experiments").mkdir(parents=True)
    (harness / "run.py").write_text(STAND_IN)
    (harness / "utils_stub.py").write_text(STUB)
    experiment = next(p for p in EXPERIMENTS.iterdir() if p.is_dir())
    target = harness / "experiments" / "soka" / experiment.name
    target.mkdir(parents=True)
    for f in experiment.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(WRAPPER), "--harness", str(harness), "-v", f"experiments/soka/{experiment.name}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # one balanced term with its σ per module: q 64×64 → (8, 8, 8, 8), v 32×64 → (4, 8, 8, 8) or (8, 8, 4, 8)
    assert result == {"type": "SokaConfig", "trainable": 2 * ((64 + 64 + 1) + (32 + 64 + 1)), "lr": 0.0003}


def test_the_wrapper_says_where_to_run_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(WRAPPER), "-v", "experiments/soka/x"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no run.py in" in proc.stderr and "--harness" in proc.stderr
