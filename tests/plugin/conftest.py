"""Fixtures for the Axolotl plugin tests: a tiny random Llama, an offline tokenizer and a small GSM8K-style file.

Nothing is downloaded: the tokenizer is a word-level vocabulary built from the data itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_models import save_tiny_llama

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

pytest.importorskip("axolotl")

ROWS = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"He has {a}+{b}={a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 4), (5, 2), (7, 1), (2, 9), (6, 6), (4, 8), (1, 3), (8, 5), (9, 9), (2, 2), (3, 7), (5, 5)]
]  # fmt: skip
MBPP_ROW = {
    "task_id": 2,
    "text": "Write a function to add two numbers.",
    "code": "def add(a, b):\n    return a + b",
    "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"],
}


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer (whitespace and punctuation split) with ``<s>``, ``</s>``, ``<pad>``, ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random ``LlamaForCausalLM`` (hidden 64) and its tokenizer, saved as safetensors."""
    from axolotl_soka.prompts import build_prompt, build_target

    texts = [build_prompt("gsm8k", r) + build_target("gsm8k", r) for r in ROWS]
    texts += [build_prompt("mbpp", MBPP_ROW) + build_target("mbpp", MBPP_ROW)]
    tokenizer = build_tokenizer(texts)
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama"), tokenizer, hidden_size=64, intermediate_size=128,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def gsm8k_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def base_config(model_dir: Path, data_file: Path, out: Path, **overrides) -> dict:
    """A CPU training config for the tiny model (fp32, no packing, plain AdamW) with ``adapter: soka``."""
    cfg = {
        "base_model": str(model_dir),
        "tokenizer_type": "AutoTokenizer",
        "plugins": ["axolotl_soka.SokaPlugin"],
        "adapter": "soka",
        "soka_max_rank": 4,
        "soka_svd": "full",
        "datasets": [
            {
                "path": str(data_file),
                "ds_type": "json",
                "type": {
                    "field_instruction": "question",
                    "field_output": "answer",
                    "format": "Question: {instruction}\nAnswer: ",
                    "no_input_format": "Question: {instruction}\nAnswer: ",
                },
            }
        ],
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "run"),
        "sequence_len": 128,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 6,
        "learning_rate": 1.0e-2,
        "lr_scheduler": "constant",
        "optimizer": "adamw_torch",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "sample_packing": False,
        "gradient_checkpointing": False,
        "save_steps": 3,
        "save_first_step": False,
        "save_safetensors": True,
        "logging_steps": 1,
        "seed": 42,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
        "dataloader_pin_memory": False,
        "special_tokens": {"pad_token": "<pad>"},
    }
    cfg.update(overrides)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def load(path: Path):
    """``path`` loaded as every Axolotl CLI command loads its YAML (``load_cfg``: plugins, validation)."""
    from axolotl.cli.config import load_cfg

    return load_cfg(str(path))


@pytest.fixture
def make_config(tiny_model_dir, gsm8k_file, tmp_path):
    """``make(**overrides)``: :func:`base_config` with ``overrides``, written to ``tmp_path/cfg.yml``."""

    def make(**overrides) -> Path:
        return write_config(
            base_config(tiny_model_dir, gsm8k_file, tmp_path, **overrides), tmp_path / "cfg.yml"
        )

    return make


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to build model weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    for cls in (transformers.AutoModelForCausalLM, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


@pytest.fixture(autouse=True)
def _fresh_plugin_manager():
    """Axolotl's PluginManager is a process-wide singleton: start and end every test with no plugins."""
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    saved = dict(manager.plugins)
    manager.plugins.clear()
    yield manager
    manager.plugins.clear()
    manager.plugins.update(saved)
