"""Fixtures for the evaluation tests: the shipped data files and a tiny random Llama with an offline tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few strings, so it can
encode any prompt; the model is a 2-layer ``LlamaForCausalLM`` with random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_models import build_tiny_model

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def gsm8k_test() -> list[dict]:
    return read_jsonl(DATA / "gsm8k" / "test.jsonl")


@pytest.fixture(scope="session")
def math500() -> list[dict]:
    return read_jsonl(DATA / "math" / "math500_test.jsonl")


@pytest.fixture(scope="session")
def mbpp_test() -> list[dict]:
    """MBPP test split: task_id 11..510."""
    return [r for r in read_jsonl(DATA / "mbpp" / "mbpp.jsonl") if 11 <= r["task_id"] <= 510]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (random B, so it changes the output) for the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-lora")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_soka_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SoKA adapter for the tiny model (``import axolotl_soka`` registers the method with PEFT)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_soka import SokaConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, SokaConfig(target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("tiny-soka")
    peft_model.save_pretrained(out)
    return out
