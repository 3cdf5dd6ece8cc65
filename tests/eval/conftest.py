"""Fixtures for the evaluation tests: the shipped data files and a tiny random Llama with an offline tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few strings, so it can
encode any prompt; the model is a 2-layer ``LlamaForCausalLM`` with random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [
        "Question: How many apples? Answer: 3 + 4 = 7 #### 7",
        "Problem: Solve x. Solution: \\boxed{2}",
        "def f(x):\n    return x + 1\n[DONE]",
        "You are an expert Python programmer, and here is your task: Your code should pass these tests:",
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_model(path: Path) -> Path:
    """Save a tiny random Llama and its tokenizer to ``path``; returns ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
