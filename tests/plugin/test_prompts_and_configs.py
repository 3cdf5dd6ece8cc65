"""The example configs validate, and their dataset formats give exactly the evaluation prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import MBPP_ROW, ROWS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "example_configs").glob("*.yml"))
RECORDS = {
    "gsm8k": ROWS[0],
    "math": {"problem": "What is $\\frac{1}{2}+\\frac{1}{2}$?", "solution": "It is $\\boxed{1}$."},
    "mbpp": MBPP_ROW,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def task_of(path: Path) -> str:
    return next(t for t in RECORDS if t in path.stem)


def strategy(type_: str | dict, tokenizer):
    """The tokenizing strategy Axolotl builds for a dataset's ``type:`` (its own loader)."""
    from axolotl.prompt_strategies import load
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault({"train_on_inputs": False, "sequence_len": 2048})
    if isinstance(type_, dict):
        return load("user_defined", tokenizer, cfg, type_)
    return load(type_, tokenizer, cfg, {})


def expected_ids(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    head = tokenizer(prompt)["input_ids"]
    tail = tokenizer(target)["input_ids"]
    if tail and tail[0] == tokenizer.bos_token_id:
        tail = tail[1:]
    return head + tail + [tokenizer.eos_token_id], len(head)


def test_there_are_example_configs():
    names = {p.name for p in CONFIGS}
    assert {"llama2-7b-soka-gsm8k.yml", "llama2-7b-soka-math.yml", "llama2-7b-soka-mbpp.yml"} <= names
    assert "demo-smollm2-gsm8k.yml" in names
    ds = json.loads((ROOT / "example_configs/deepspeed/zero3_bf16.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_datasets_give_the_evaluation_prompts(path, tokenizer):
    from axolotl_soka.prompts import build_prompt, build_target

    task = task_of(path)
    record = RECORDS[task]
    datasets = yaml.safe_load(path.read_text())["datasets"]
    assert datasets
    for ds in datasets:
        strat = strategy(ds["type"], tokenizer)
        if isinstance(ds["type"], dict):  # user-defined mapping: check the text itself
            instruction, inp, output, system = strat.parse_instruction_fields(record)
            assert next(strat.prompter.build_prompt_w_system(system, instruction, inp)) == build_prompt(
                task, record
            )
            assert output == build_target(task, record)
        ids, prompt_len = expected_ids(tokenizer, build_prompt(task, record), build_target(task, record))
        tokenized = strat.tokenize_prompt(record)
        assert tokenized["input_ids"] == ids
        assert tokenized["labels"] == [-100] * prompt_len + ids[prompt_len:]


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_custom_strategies_load_through_axolotl(task, tokenizer):
    from axolotl_soka.prompt_strategies.task import TaskPromptTokenizingStrategy
    from axolotl_soka.prompts import build_prompt, build_target

    strat = strategy(f"axolotl_soka.prompt_strategies.{task}", tokenizer)
    assert isinstance(strat, TaskPromptTokenizingStrategy) and strat.task == task
    ids, prompt_len = expected_ids(
        tokenizer, build_prompt(task, RECORDS[task]), build_target(task, RECORDS[task])
    )
    tokenized = strat.tokenize_prompt(RECORDS[task])
    assert tokenized["input_ids"] == ids
    assert tokenized["labels"][:prompt_len] == [-100] * prompt_len


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_configs_validate(path, monkeypatch):
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    monkeypatch.chdir(ROOT)
    cfg = DictDefault(yaml.safe_load(path.read_text()))
    prepare_plugins(cfg)
    validated = validate_config(cfg)
    assert validated.adapter == "soka" and validated.merge_method == "legacy"
    assert validated.plugins == ["axolotl_soka.SokaPlugin"]
    if path.stem.startswith("llama2-7b"):
        assert validated.base_model == "meta-llama/Llama-2-7b-hf"
        assert validated.deepspeed == "example_configs/deepspeed/zero3_bf16.json" and validated.bf16
