"""Global parameter budget: parsing, the allocator on known answers, and exactness inside a model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import axolotl_soka  # noqa: F401
from axolotl_soka import SokaConfig
from axolotl_soka.kron import BudgetItem, allocate_budget, parse_budget


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.99M", 990_000),
        ("500k", 500_000),
        ("1.2e6", 1_200_000),
        (990_000, 990_000),
        ("2B", 2 * 10**9),
        (7.0, 7),
    ],
)
def test_parse_budget(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value", ["abc", "-5", 0, -3, True, "1.5X", ""])
def test_parse_budget_rejects(value):
    with pytest.raises(ValueError, match="param_budget"):
        parse_budget(value)


def test_config_rejects_bad_budget_naming_the_field():
    with pytest.raises(ValueError, match=r"param_budget must be a positive number such as 990000 or '0.99M'"):
        SokaConfig(param_budget="lots")


def item(spectrum, energy, cost, min_rank=0, cap=None):
    s = torch.tensor(spectrum, dtype=torch.float64)
    return BudgetItem(s, energy, cost, min_rank, cap if cap is not None else len(spectrum))


def test_allocator_takes_the_best_energy_per_parameter_first():
    # gains per parameter: A1 = 9/10/10 = 0.09, A2 = 0.01, B1 = B2 = 4/8/5 = 0.1
    items = [item([3.0, 1.0], 10.0, 10), item([2.0, 2.0], 8.0, 5)]
    assert allocate_budget(items, 20) == [1, 2]
    assert allocate_budget(items, 10) == [0, 2]
    assert allocate_budget(items, 9) == [0, 1]
    assert allocate_budget(items, 30) == [2, 2]


def test_allocator_fills_with_cheaper_terms_when_the_best_does_not_fit():
    # the best-per-parameter term (cost 100) no longer fits, cheaper ones still do
    items = [item([10.0, 10.0], 200.0, 100), item([1.0] * 50, 500.0, 3)]
    ranks = allocate_budget(items, 130)
    assert ranks[0] == 1
    spent = ranks[0] * 100 + ranks[1] * 3
    assert spent <= 130 and 130 - spent < 3


def test_allocator_respects_min_rank_and_caps():
    items = [item([5.0, 4.0, 3.0], 50.0, 10, min_rank=1), item([9.0, 8.0, 7.0], 194.0, 10, cap=1)]
    assert allocate_budget(items, 1000) == [3, 1]
    with pytest.raises(ValueError, match="smaller than the 20 parameters that min_rank already needs"):
        allocate_budget([item([1.0], 1.0, 10, min_rank=1)] * 2, 15)


def tiny_llama(hidden: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_budget_inside_a_model_is_met_within_one_percent(tmp_path):
    model = tiny_llama()
    original = copy.deepcopy(model)
    budget = 60_000
    config = SokaConfig(param_budget=budget, min_rank=0, max_rank=32, energy_threshold=1.0, elbow_mode="none")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert budget * 0.99 <= trainable <= budget
    selections = peft_model.base_model.soka_selections["default"]
    assert trainable == sum(s.trainable_params for s in selections.values())
    assert "budget" in {s.decision.decided_by for s in selections.values()}
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["param_budget"] == budget and saved["resolved"] is True
    reloaded = PeftModel.from_pretrained(original, tmp_path)
    assert sum(p.numel() for p in reloaded.parameters() if p.numel() and "soka_" in _name(reloaded, p)) > 0
    assert {k: v for k, v in saved["rank_pattern"].items()} == {n: s.rank for n, s in selections.items()}


def _name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def test_budget_smaller_than_min_rank_fails_before_any_weight_changes():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="raise the budget or lower min_rank"):
        get_peft_model(model, SokaConfig(param_budget=1000, min_rank=1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
