"""SoKA against PEFT's tuner contract: deleting, config reuse, layers_to_transform, low-memory loading,
several adapters and the options SoKA does not support."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_tuner import INPUT_IDS, logits, rel_error, soka_layers, tiny_llama, train

from axolotl_soka import SokaConfig


def test_delete_kpsvd_adapter_restores_original_weights():
    model = tiny_llama()
    original = copy.deepcopy(model)
    reference = logits(original)
    peft_model = get_peft_model(
        model, SokaConfig(max_rank=2, svd="full", target_modules=["q_proj", "v_proj"])
    )
    peft_model.add_adapter("other", SokaConfig(max_rank=2, init="zero", target_modules=["k_proj"]))
    peft_model.delete_adapter("default")
    peft_model.set_adapter("other")  # zero init: ΔW = 0
    assert "default" not in peft_model.base_model.soka_selections
    for name, layer in soka_layers(peft_model).items():
        assert "default" not in layer.soka_residual and "default" not in layer.soka_A0
        torch.testing.assert_close(layer.get_base_layer().weight, original.get_submodule(name).weight)
    assert rel_error(logits(peft_model), reference) <= 1e-5
    unloaded = peft_model.unload()  # raised KeyError on the deleted adapter's residual flag
    assert rel_error(logits(unloaded), reference) <= 1e-5


def test_config_object_builds_several_models():
    config = SokaConfig(max_rank=2, svd="full", target_modules=["q_proj"])
    first = get_peft_model(tiny_llama(seed=0), config)
    assert config.resolved is False and config.rank_pattern == {}  # the caller's object is left as given
    assert first.peft_config["default"].resolved is True
    second_base = tiny_llama(seed=1)
    reference = logits(copy.deepcopy(second_base))
    second = get_peft_model(second_base, config)
    assert rel_error(logits(second), reference) <= 1e-5  # failed: "created from a saved config"
    train(second, steps=1)


@pytest.mark.parametrize("target_modules", ["all-linear", "q_proj", r".*\.q_proj"])
def test_layers_to_transform_with_string_target_raises(target_modules):
    with pytest.raises(ValueError, match="layers_to_transform"):
        SokaConfig(target_modules=target_modules, layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_pattern"):
        SokaConfig(target_modules=target_modules, layers_pattern="layers")


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match="layers_to_transform"):
        SokaConfig(target_modules=["q_proj"], layers_pattern="layers")


@pytest.mark.parametrize("target_modules", [None, ["q_proj", "down_proj"]])
@pytest.mark.parametrize("layers", [1, [1]])
@pytest.mark.parametrize("layers_pattern", [None, "layers"])
def test_layers_to_transform_selects_layers(target_modules, layers, layers_pattern):
    config = SokaConfig(
        max_rank=2,
        target_modules=target_modules,
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
    )
    peft_model = get_peft_model(tiny_llama(), config)
    names = set(soka_layers(peft_model))
    assert names and all(name.startswith("model.layers.1.") for name in names)
    if target_modules is None:  # every linear layer of layer 1, still not the output head
        assert len(names) == 7
    assert set(peft_model.base_model.soka_selections["default"]) == names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_cpu_mem_usage_keeps_fp32_factors(tmp_path, dtype):
    peft_model = get_peft_model(tiny_llama(), SokaConfig(max_rank=2, svd="full"))
    train(peft_model, steps=2)
    peft_model.save_pretrained(tmp_path)
    loaded = {}
    for low_cpu_mem_usage in (False, True):
        model = PeftModel.from_pretrained(
            tiny_llama(dtype=dtype), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage
        )
        loaded[low_cpu_mem_usage] = model
    normal, low = soka_layers(loaded[False]), soka_layers(loaded[True])
    for name, layer in low.items():
        for attr in ("soka_A", "soka_B", "soka_s", "soka_A0", "soka_B0"):
            tensor = getattr(layer, attr)["default"]
            assert tensor.dtype == torch.float32, f"{name}.{attr} rounded to {tensor.dtype}"
            assert torch.equal(tensor, getattr(normal[name], attr)["default"])
        assert torch.equal(layer.get_base_layer().weight, normal[name].get_base_layer().weight)
    assert torch.equal(logits(loaded[True]), logits(loaded[False]))


def test_second_kpsvd_adapter_leaves_first_adapter_outputs():
    model = tiny_llama()
    reference = logits(copy.deepcopy(model))
    peft_model = get_peft_model(
        model, SokaConfig(max_rank=2, svd="full", target_modules=["model.layers.0.self_attn.q_proj"])
    )
    first = logits(peft_model)
    peft_model.add_adapter(
        "second", SokaConfig(max_rank=2, svd="full", target_modules=["model.layers.1.self_attn.v_proj"])
    )
    assert peft_model.active_adapters == ["default"]
    assert rel_error(logits(peft_model), first) <= 1e-6
    peft_model.set_adapter("second")
    assert rel_error(logits(peft_model), reference) <= 1e-5
    peft_model.set_adapter("default")
    assert rel_error(logits(peft_model), first) <= 1e-6


def test_mixed_batch_adapter_names_raises():
    peft_model = get_peft_model(tiny_llama(), SokaConfig(max_rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter_names.*unsupported for SoKA"):
        peft_model(input_ids=INPUT_IDS, adapter_names=["default"] * INPUT_IDS.shape[0])


def test_autocast_adapter_dtype_false_raises(tmp_path):
    with pytest.raises(ValueError, match="autocast_adapter_dtype=False is unsupported for SoKA"):
        get_peft_model(
            tiny_llama(), SokaConfig(max_rank=2, target_modules=["q_proj"]), autocast_adapter_dtype=False
        )
    peft_model = get_peft_model(tiny_llama(), SokaConfig(max_rank=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="autocast_adapter_dtype=False is unsupported for SoKA"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, autocast_adapter_dtype=False)


def test_base_model_state_dict_is_the_residual_until_unloaded():
    """Documented choice: like LoRA's PiSSA init, the base weight itself holds ``W − ΔW0`` while a kpsvd
    adapter is active, and ``get_base_model_state_dict`` reports the base as it is."""
    from peft import get_base_model_state_dict

    model = tiny_llama()
    original = copy.deepcopy(model).state_dict()
    peft_model = get_peft_model(model, SokaConfig(max_rank=2, svd="full", target_modules=["q_proj"]))
    state = get_base_model_state_dict(peft_model)
    assert state.keys() == original.keys()
    for name, layer in soka_layers(peft_model).items():
        residual = original[f"{name}.weight"] - layer.init_delta_weight("default")
        torch.testing.assert_close(state[f"{name}.weight"], residual)
    restored = peft_model.unload().state_dict()
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value)
