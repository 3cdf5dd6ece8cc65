"""SoKA as a PEFT method on a tiny Llama: init, training, save/load, merge, unload, export and errors."""

import copy
import importlib
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import TINY_LLAMA
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import axolotl_soka
from axolotl_soka import SokaConfig, SokaLayer, export_delta_adapter
from axolotl_soka.kron import kpsvd

# the package re-exports a function named like this submodule, so fetch the module itself
kpsvd_module = importlib.import_module("axolotl_soka.kron.kpsvd")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = [
    f"model.layers.{i}.{block}.{proj}"
    for i in range(2)
    for block, projs in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:]))
    for proj in projs
]
INPUT_IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1234))


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(dtype).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the logit scale (max |expected|)."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def soka_layers(model: nn.Module) -> dict[str, SokaLayer]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, SokaLayer):
            found[name.removeprefix("base_model.model.")] = module
    return found


def train(peft_model: nn.Module, steps: int = 3, lr: float = 1e-2) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss = peft_model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def forbid_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("an SVD ran while loading a saved SoKA adapter")

    # every module of the package that bound the decomposition functions by name (wherever the init lives)
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("axolotl_soka"):
            continue
        for attr, function in (
            ("kpsvd", kpsvd_module.kpsvd),
            ("randomized_svd", kpsvd_module.randomized_svd),
        ):
            if getattr(module, attr, None) is function:
                monkeypatch.setattr(module, attr, forbidden)
    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    monkeypatch.setattr(torch.linalg, "svdvals", forbidden)
    monkeypatch.setattr(torch, "svd_lowrank", forbidden)


# ---------------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize(
    ("sigma_mode", "svd", "alpha"),
    [
        ("separate", "full", 1.0),
        ("sqrt", "full", 1.0),
        ("separate", "lowrank", 1.0),
        ("sqrt", "lowrank", 1.0),
        ("separate", "full", 2.0),
        ("sqrt", "full", -0.5),
    ],
)
def test_kpsvd_init_keeps_outputs_and_residualises_the_base(sigma_mode, svd, alpha):
    model = tiny_llama()
    original = copy.deepcopy(model)
    reference = logits(original)
    peft_model = get_peft_model(model, SokaConfig(max_rank=4, svd=svd, sigma_mode=sigma_mode, alpha=alpha))
    assert rel_error(logits(peft_model), reference) <= 1e-5

    layers = soka_layers(peft_model)
    assert sorted(layers) == sorted(ALL_TARGETS)  # all linear layers except lm_head
    selections = peft_model.base_model.soka_selections["default"]
    for name, layer in layers.items():
        w_orig = original.get_submodule(name).weight
        w_base = layer.get_base_layer().weight
        delta0 = layer.init_delta_weight("default")
        # the base holds the residual W − ΔW0, and ΔW0 is not negligible
        torch.testing.assert_close(w_base + delta0, w_orig, rtol=0, atol=1e-6)
        assert float(delta0.norm() / w_orig.norm()) > 0.05
        # at step 0 the trainable factors reproduce ΔW0 exactly
        torch.testing.assert_close(layer.get_delta_weight("default"), delta0, rtol=0, atol=1e-7)
        assert layer.soka_A["default"].shape[0] == selections[name].rank
        if svd == "full":  # ΔW0 is the best Kronecker-rank-r approximation of the original W
            result = kpsvd(w_orig, selections[name].shape, selections[name].rank, method="full")
            best = torch.einsum("k,kij,kab->iajb", result.S, result.A, result.B).reshape(w_orig.shape)
            torch.testing.assert_close(delta0, best, rtol=0, atol=1e-6)
        if sigma_mode == "separate":
            assert set(layer.soka_s) == {"default"}
        else:
            assert len(layer.soka_s) == 0

    # the adapters carry the removed part: without them the model is measurably different
    with peft_model.disable_adapter():
        assert rel_error(logits(peft_model), reference) > 1e-3


def test_zero_init_leaves_base_bit_identical():
    model = tiny_llama()
    original = copy.deepcopy(model)
    reference = logits(original)
    peft_model = get_peft_model(model, SokaConfig(max_rank=4, init="zero"))
    assert torch.equal(logits(peft_model), reference)
    for name, layer in soka_layers(peft_model).items():
        assert torch.equal(layer.get_base_layer().weight, original.get_submodule(name).weight)
        assert torch.count_nonzero(layer.soka_B["default"]) == 0
        assert torch.count_nonzero(layer.soka_A["default"]) > 0
        assert len(layer.soka_A0) == 0 and len(layer.soka_B0) == 0


@pytest.mark.parametrize("sigma_mode", ["separate", "sqrt"])
def test_only_soka_parameters_train_and_their_count(sigma_mode):
    peft_model = get_peft_model(
        tiny_llama(), SokaConfig(max_rank=4, svd="full", sigma_mode=sigma_mode, rank_pattern={"v_proj": 2})
    )
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("soka_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "soka_" not in n)
    selections = peft_model.base_model.soka_selections["default"]
    expected = 0
    for sel in selections.values():
        m, n, p, q = sel.shape.as_list()
        expected += sel.rank * (m * n + p * q) + (sel.rank if sigma_mode == "separate" else 0)
        assert sel.trainable_params == sel.rank * (m * n + p * q) + (
            sel.rank if sigma_mode == "separate" else 0
        )
    assert sum(p.numel() for p in trainable.values()) == expected
    # by hand for this model: 2 layers × (q,o: 8·8+8·8; k,v: 4·8+8·8; gate,up: 8·8+12·8; down: 8·8+8·12)
    per_term = {"q_proj": 128, "k_proj": 96, "v_proj": 96, "o_proj": 128}
    per_term |= {"gate_proj": 160, "up_proj": 160, "down_proj": 160}
    extra = 1 if sigma_mode == "separate" else 0
    by_hand = 2 * sum((2 if proj == "v_proj" else 4) * (cost + extra) for proj, cost in per_term.items())
    assert expected == by_hand


def test_rank_pattern_is_respected():
    model = tiny_llama()
    original = copy.deepcopy(model)
    peft_model = get_peft_model(model, SokaConfig(max_rank=4, svd="full", rank_pattern={"q_proj": 2}))
    selections = peft_model.base_model.soka_selections["default"]
    layers = soka_layers(peft_model)
    for name, sel in selections.items():
        if name.endswith("q_proj"):
            assert (sel.rank, sel.decision.decided_by) == (2, "pattern")
            assert layers[name].soka_A["default"].shape == (2, 8, 8)
            full = kpsvd(original.get_submodule(name).weight, sel.shape, 64, method="full")
            kept = float(full.S[:2].double().pow(2).sum()) / full.total_energy
            assert sel.decision.energy_kept == pytest.approx(kept, rel=1e-5)
        else:
            assert sel.decision.decided_by != "pattern"
            assert 1 <= sel.rank <= 4
    config = peft_model.peft_config["default"]
    assert config.resolved is True
    assert config.rank_pattern == {name: sel.rank for name, sel in selections.items()}
    assert config.rank_pattern["model.layers.1.self_attn.q_proj"] == 2


def test_rank_pattern_full_module_name():
    peft_model = get_peft_model(
        tiny_llama(), SokaConfig(max_rank=4, svd="full", rank_pattern={"model.layers.1.mlp.up_proj": 1})
    )
    selections = peft_model.base_model.soka_selections["default"]
    chosen = selections["model.layers.1.mlp.up_proj"]
    assert (chosen.rank, chosen.decision.decided_by) == (1, "pattern")
    assert selections["model.layers.0.mlp.up_proj"].decision.decided_by != "pattern"
    assert selections["model.layers.0.mlp.up_proj"].rank == 4


def test_rank_zero_leaves_module_unadapted(tmp_path):
    model = tiny_llama()
    original = copy.deepcopy(model)
    reference = logits(original)
    peft_model = get_peft_model(
        model, SokaConfig(min_rank=0, max_rank=4, svd="full", rank_pattern={"k_proj": 0})
    )
    selections = peft_model.base_model.soka_selections["default"]
    for i in range(2):
        name = f"model.layers.{i}.self_attn.k_proj"
        module = peft_model.base_model.model.get_submodule(name)
        assert type(module) is nn.Linear
        assert torch.equal(module.weight, original.get_submodule(name).weight)
        assert (selections[name].rank, selections[name].decision.decided_by) == (0, "pattern")
        assert selections[name].trainable_params == 0
        assert selections[name].to_dict()["rank"] == 0
    assert len(soka_layers(peft_model)) == len(ALL_TARGETS) - 2
    assert rel_error(logits(peft_model), reference) <= 1e-5
    # the rank 0 is saved and survives a reload
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 0
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    assert type(loaded.base_model.model.get_submodule("model.layers.1.self_attn.k_proj")) is nn.Linear
    assert rel_error(logits(loaded), reference) <= 1e-5


def test_resolved_config_reused_on_fresh_model_fails_at_forward():
    first = get_peft_model(tiny_llama(), SokaConfig(max_rank=4, svd="full"))
    config = first.peft_config["default"]
    assert config.resolved is True
    fresh = tiny_llama()
    before = snapshot(fresh)
    reused = get_peft_model(fresh, config)
    with pytest.raises(RuntimeError, match="from_pretrained"):
        reused(input_ids=INPUT_IDS)
    # nothing was residualised: the base weights are still the originals
    for name, layer in soka_layers(reused).items():
        assert torch.equal(layer.get_base_layer().weight, before[f"{name}.weight"])


# ---------------------------------------------------------------------------------------------------- trained


@pytest.fixture(scope="module", params=["separate", "sqrt"])
def trained(request, tmp_path_factory):
    model = tiny_llama()
    original = copy.deepcopy(model)
    reference = logits(original)
    config = SokaConfig(max_rank=4, svd="full", sigma_mode=request.param, rank_pattern={"v_proj": 2})
    peft_model = get_peft_model(model, config)
    step0 = logits(peft_model)
    train(peft_model)
    directory = tmp_path_factory.mktemp(f"adapter_{request.param}")
    peft_model.save_pretrained(directory)
    return SimpleNamespace(
        original=original,
        reference=reference,
        step0=step0,
        peft_model=peft_model,
        logits=logits(peft_model),
        dir=directory,
        sigma_mode=request.param,
        ranks={n: s.rank for n, s in peft_model.base_model.soka_selections["default"].items()},
    )


def test_training_changes_outputs(trained):
    assert rel_error(trained.step0, trained.reference) <= 1e-5
    assert rel_error(trained.logits, trained.reference) > 1e-2


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_reload_reproduces_trained_outputs_without_svd(trained, monkeypatch, low_cpu_mem_usage):
    fresh = copy.deepcopy(trained.original)
    forbid_svd(monkeypatch)
    loaded = PeftModel.from_pretrained(fresh, trained.dir, low_cpu_mem_usage=low_cpu_mem_usage)
    monkeypatch.undo()
    assert rel_error(logits(loaded), trained.logits) <= 1e-5
    trained_layers = soka_layers(trained.peft_model)
    loaded_layers = soka_layers(loaded)
    assert loaded_layers.keys() == trained_layers.keys()
    for name, layer in loaded_layers.items():
        assert layer.r["default"] == trained.ranks[name]
        torch.testing.assert_close(
            layer.get_base_layer().weight, trained_layers[name].get_base_layer().weight, rtol=0, atol=1e-6
        )
        assert layer.soka_A["default"].device.type == "cpu"


def test_saved_files(trained):
    config = json.loads((trained.dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "SOKA"
    assert config["resolved"] is True
    assert config["sigma_mode"] == trained.sigma_mode
    assert set(config["rank_pattern"]) == set(ALL_TARGETS) == set(config["shape_pattern"])
    for name in ALL_TARGETS:
        assert config["rank_pattern"][name] == (2 if name.endswith("v_proj") else 4)
    assert config["shape_pattern"]["model.layers.0.self_attn.k_proj"] == [4, 8, 8, 8]
    assert config["shape_pattern"]["model.layers.1.mlp.up_proj"] == [8, 8, 12, 8]
    assert config["shape_pattern"]["model.layers.1.mlp.down_proj"] == [8, 8, 8, 12]

    tensors = load_file(trained.dir / "adapter_model.safetensors")
    names = ["soka_A", "soka_B", "soka_A0", "soka_B0"] + (
        ["soka_s"] if trained.sigma_mode == "separate" else []
    )
    expected_keys = {f"base_model.model.{t}.{n}" for t in ALL_TARGETS for n in names}
    assert set(tensors) == expected_keys
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.soka_A"].shape == tensors[f"{q}.soka_A0"].shape == (4, 8, 8)
    assert tensors[f"{q}.soka_B0"].dtype == torch.float32
    # the stored init factors differ from the trained ones
    assert not torch.equal(tensors[f"{q}.soka_B"], tensors[f"{q}.soka_B0"])


def test_merge_and_unload(trained):
    loaded = PeftModel.from_pretrained(copy.deepcopy(trained.original), trained.dir)
    merged = loaded.merge_and_unload()
    assert not soka_layers(merged)
    for name in ALL_TARGETS:
        assert type(merged.get_submodule(name)) is nn.Linear
    assert rel_error(logits(merged), trained.logits) <= 1e-5


def test_merge_then_unmerge_restores_weights(trained):
    loaded = PeftModel.from_pretrained(copy.deepcopy(trained.original), trained.dir)
    layers = soka_layers(loaded)
    before = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    loaded.merge_adapter()
    for name, layer in layers.items():
        assert layer.merged
        expected = before[name] + layer.get_delta_weight("default")
        torch.testing.assert_close(layer.get_base_layer().weight, expected, rtol=0, atol=1e-7)
    assert rel_error(logits(loaded), trained.logits) <= 1e-5
    loaded.unmerge_adapter()
    for name, layer in layers.items():
        assert not layer.merged
        torch.testing.assert_close(layer.get_base_layer().weight, before[name], rtol=0, atol=1e-6)
    assert rel_error(logits(loaded), trained.logits) <= 1e-5


def test_unload_restores_the_original_weights(trained):
    loaded = PeftModel.from_pretrained(copy.deepcopy(trained.original), trained.dir)
    unloaded = loaded.unload()
    assert not soka_layers(unloaded)
    for name in ALL_TARGETS:
        module = unloaded.get_submodule(name)
        assert type(module) is nn.Linear
        torch.testing.assert_close(
            module.weight, trained.original.get_submodule(name).weight, rtol=0, atol=1e-6
        )
    assert rel_error(logits(unloaded), trained.reference) <= 1e-5


def test_export_delta_adapter_loads_on_the_untouched_original(trained, tmp_path):
    out = export_delta_adapter(trained.peft_model, tmp_path / "delta")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["init"], config["sigma_mode"], config["resolved"]) == ("zero", "sqrt", True)
    assert config["rank_pattern"] == {name: 2 * r for name, r in trained.ranks.items()}
    original = copy.deepcopy(trained.original)
    loaded = PeftModel.from_pretrained(original, out)
    assert rel_error(logits(loaded), trained.logits) <= 1e-5
    for name, layer in soka_layers(loaded).items():
        assert layer.r["default"] == 2 * trained.ranks[name]
        assert layer.soka_A["default"].shape[0] == 2 * trained.ranks[name]
        # residual-free: the base is the original weight, bit for bit
        assert torch.equal(layer.get_base_layer().weight, trained.original.get_submodule(name).weight)
    merged = loaded.merge_and_unload()
    assert rel_error(logits(merged), trained.logits) <= 1e-5


def test_export_rejects_zero_init(tmp_path):
    peft_model = get_peft_model(tiny_llama(), SokaConfig(max_rank=2, init="zero"))
    with pytest.raises(ValueError, match="init='zero'"):
        export_delta_adapter(peft_model, tmp_path)


def test_loading_the_same_adapter_again_does_not_subtract_twice(trained):
    loaded = PeftModel.from_pretrained(copy.deepcopy(trained.original), trained.dir, is_trainable=True)
    before = snapshot(loaded)
    loaded.load_adapter(trained.dir, adapter_name="default", is_trainable=True)
    assert_state_unchanged(loaded, before)
    assert rel_error(logits(loaded), trained.logits) <= 1e-5


def test_resuming_on_the_trained_model_keeps_outputs(trained):
    resumed = copy.deepcopy(trained.peft_model)
    resumed.load_adapter(trained.dir, adapter_name="default", is_trainable=True)
    assert rel_error(logits(resumed), trained.logits) <= 1e-6
    for name, layer in soka_layers(resumed).items():
        torch.testing.assert_close(
            layer.get_base_layer().weight + layer.init_delta_weight("default"),
            trained.original.get_submodule(name).weight,
            rtol=0,
            atol=1e-6,
        )


def test_svd_guard_is_effective(monkeypatch):
    forbid_svd(monkeypatch)
    with pytest.raises(AssertionError, match="an SVD ran"):
        get_peft_model(tiny_llama(), SokaConfig(max_rank=2, svd="full", target_modules=["q_proj"]))


def test_second_kpsvd_adapter_on_the_same_base_is_refused_before_any_change(trained):
    """Loading a kpsvd adapter under a second name would subtract its init from the shared base again."""
    loaded = PeftModel.from_pretrained(copy.deepcopy(trained.original), trained.dir)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    with pytest.raises(ValueError, match="already holds a residual-based SoKA adapter") as info:
        loaded.load_adapter(trained.dir, adapter_name="second")
    assert "export_delta_adapter" in str(info.value)
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert rel_error(logits(loaded), trained.logits) <= 1e-5


def test_add_second_zero_init_adapter():
    model = tiny_llama()
    reference = logits(copy.deepcopy(model))
    peft_model = get_peft_model(model, SokaConfig(max_rank=2, svd="full", target_modules=["q_proj"]))
    peft_model.add_adapter("other", SokaConfig(max_rank=2, init="zero", target_modules=["q_proj"]))
    assert set(peft_model.base_model.soka_selections) == {"default", "other"}
    assert peft_model.peft_config["other"].resolved is True
    peft_model.set_adapter("other")  # the inactive default adapter's ΔW0 goes back into the base
    with torch.no_grad():
        for layer in soka_layers(peft_model).values():
            assert torch.count_nonzero(layer.soka_B["other"]) == 0
            assert layer.soka_residual == {"default": False}
    assert rel_error(logits(peft_model), reference) <= 1e-5  # zero init on the original weights
    # zero init on top of the default adapter's residual base
    peft_model.base_model.set_adapter(["default", "other"])
    assert rel_error(logits(peft_model), reference) <= 1e-5
    with peft_model.disable_adapter():
        assert rel_error(logits(peft_model), reference) > 1e-3  # the residual base without the adapters


def test_config_from_json_without_weights_fails_at_forward(trained):
    config = SokaConfig.from_pretrained(trained.dir)
    assert config.resolved is True
    reused = get_peft_model(copy.deepcopy(trained.original), config)
    with pytest.raises(RuntimeError, match="from_pretrained"):
        reused(input_ids=INPUT_IDS)


# ---------------------------------------------------------------------------------------------------- bf16


def bf16_ulp(x: float) -> float:
    """Spacing of bf16 numbers (8 significant bits) at magnitude ``x``."""
    return 2.0 ** (math.floor(math.log2(x)) - 7)


def test_bf16_base_init_error_is_bf16_rounding():
    model = tiny_llama(dtype=torch.bfloat16)
    original = copy.deepcopy(model)
    exact = logits(copy.deepcopy(original).float())  # the same bf16 weights, computed in fp32
    reference = logits(original)
    peft_model = get_peft_model(model, SokaConfig(max_rank=4, svd="full"))
    for layer in soka_layers(peft_model).values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert layer.soka_A["default"].dtype == layer.soka_A0["default"].dtype == torch.float32
        factor = layer.soka_A["default"].detach()
        assert not torch.equal(factor, factor.to(torch.bfloat16).float()), "fp32 factors were rounded to bf16"
    out = logits(peft_model)
    ulp = bf16_ulp(float(reference.abs().max()))
    # Sources of error, all bf16 rounding: the residual W − ΔW0 is rounded to bf16 (≤ ½ ulp per entry, the same
    # size as the activation rounding every bf16 matmul already does), the adapter path runs in bf16, and the
    # logits themselves are bf16 (½ ulp each). The plain bf16 model is itself ≈ 1 ulp of the logit scale from
    # the fp32 computation, so SoKA must be within a few ulps of it and no farther from exact than ~2× the
    # plain bf16 model. (A lost or doubled residual would be far outside: checked below.)
    bound = 4 * ulp
    assert float((out - reference).abs().max()) <= bound
    base_noise = float((reference - exact).abs().max())
    assert float((out - exact).abs().max()) <= 2.5 * base_noise
    with peft_model.disable_adapter():
        assert float((logits(peft_model) - reference).abs().max()) > 3 * bound


# ---------------------------------------------------------------------------------------------------- PiSSA


@pytest.mark.parametrize("rank", [1, 3])
def test_lora_shape_matches_pissa_init(rank):
    targets = ["q_proj", "v_proj", "down_proj"]
    model = tiny_llama()
    lora_model = copy.deepcopy(model)
    soka = get_peft_model(
        model,
        SokaConfig(
            factor_shape="lora",
            svd="full",
            sigma_mode="sqrt",
            target_modules=targets,
            rank_pattern=dict.fromkeys(targets, rank),
        ),
    )
    pissa = get_peft_model(
        lora_model, LoraConfig(init_lora_weights="pissa", r=rank, lora_alpha=rank, target_modules=targets)
    )
    soka_mods = soka_layers(soka)
    assert len(soka_mods) == 6
    for name, layer in soka_mods.items():
        assert layer.kshape["default"].as_list() == [layer.out_features, 1, 1, layer.in_features]
        lora_layer = pissa.base_model.model.get_submodule(name)
        torch.testing.assert_close(
            layer.get_base_layer().weight, lora_layer.get_base_layer().weight, rtol=0, atol=1e-6
        )
        lora_a, lora_b = lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight
        torch.testing.assert_close(layer.init_delta_weight("default"), lora_b @ lora_a, rtol=0, atol=1e-6)
        # sqrt mode: A_k = √σ_k u_k (out×1), B_k = √σ_k v_kᵀ (1×in), i.e. PiSSA's B and A up to a joint sign
        soka_a, soka_b = layer.soka_A["default"].detach(), layer.soka_B["default"].detach()
        for k in range(rank):
            sign = torch.sign(torch.dot(soka_a[k, :, 0], lora_b[:, k]))
            torch.testing.assert_close(soka_a[k, :, 0] * sign, lora_b[:, k], rtol=0, atol=1e-5)
            torch.testing.assert_close(soka_b[k, 0, :] * sign, lora_a[k, :], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- errors


class FakeBnbLinear(nn.Linear):
    """Looks like a bitsandbytes layer to SoKA (module path contains "bitsandbytes")."""


FakeBnbLinear.__module__ = "fake_bitsandbytes.nn.modules"


def quantised_class_late(model: nn.Module) -> None:
    old = model.model.layers[1].self_attn.v_proj
    new = FakeBnbLinear(old.in_features, old.out_features, bias=False)
    new.weight.data.copy_(old.weight.data)
    model.model.layers[1].self_attn.v_proj = new


def int8_weight_late(model: nn.Module) -> None:
    layer = model.model.layers[1].mlp.up_proj
    layer.weight = nn.Parameter(torch.ones(layer.weight.shape, dtype=torch.int8), requires_grad=False)


BAD_INPUTS = {
    "threshold_zero": ({"energy_threshold": 0.0}, ["energy_threshold", "(0, 1]"], None),
    "threshold_above_one": ({"energy_threshold": 1.01}, ["energy_threshold", "(0, 1]"], None),
    "negative_min_rank": ({"min_rank": -1}, ["min_rank", "non-negative integer"], None),
    "min_above_max": ({"min_rank": 6, "max_rank": 4}, ["min_rank (6)", "max_rank (4)"], None),
    "elbow_mode": ({"elbow_mode": "elbow"}, ["elbow_mode", "'elbow'", "kneedle, curvature, none"], None),
    "rank_combine": ({"rank_combine": "sum"}, ["rank_combine", "'sum'", "min, max, energy, elbow"], None),
    "init": ({"init": "pissa"}, ["init", "'pissa'", "kpsvd, zero"], None),
    "svd": ({"svd": "qr"}, ["svd", "'qr'", "full, lowrank"], None),
    "sigma_mode": ({"sigma_mode": "both"}, ["sigma_mode", "'both'", "separate, sqrt"], None),
    "factor_shape_rule": ({"factor_shape": "square"}, ["factor_shape", "'square'", "balanced, lora"], None),
    "factor_shape_len": ({"factor_shape": [8, 8, 8]}, ["factor_shape", "four positive integers"], None),
    "shape_pattern_rule": (
        {"shape_pattern": {"q_proj": "tall"}},
        ["shape_pattern['q_proj']", "'tall'", "balanced, lora"],
        None,
    ),
    "rank_pattern_negative": (
        {"rank_pattern": {"q_proj": -2}},
        ["rank_pattern['q_proj']", "non-negative integer"],
        None,
    ),
    "alpha_zero": ({"alpha": 0.0}, ["alpha", "non-zero"], None),
    "dropout": ({"dropout": 1.0}, ["dropout", "[0, 1)"], None),
    "chunk_tokens": ({"chunk_tokens": 0}, ["chunk_tokens", "positive integer or None", "got 0"], None),
    "forward_mode": ({"forward_mode": "merged"}, ["forward_mode", "'merged'", "factored, dense"], None),
    "search_window": ({"search_window": 2}, ["search_window", "at least 3"], None),
    "no_match": (
        {"target_modules": ["nonexistent_proj"]},
        ["target_modules", "nonexistent_proj", "matched no module", "model.layers.0.self_attn.q_proj"],
        None,
    ),
    "embedding": (
        {"target_modules": ["embed_tokens"]},
        ["'model.embed_tokens'", "Embedding", "not an nn.Linear"],
        None,
    ),
    "mlp_block": (
        {"target_modules": ["mlp"]},
        ["'model.layers.0.mlp'", "LlamaMLP", "not an nn.Linear"],
        None,
    ),
    # q_proj (64×64, first in order) would be fine with [8, 8, 8, 8]; k_proj (32×64, next) is not
    "shape_later_module": (
        {"factor_shape": [8, 8, 8, 8]},
        ["[8, 8, 8, 8]", "'model.layers.0.self_attn.k_proj'", "out=32", "in=64"],
        None,
    ),
    # every module is fine except the very last one
    "shape_pattern_last_module": (
        {"shape_pattern": {"model.layers.1.mlp.down_proj": [3, 3, 3, 3]}},
        ["[3, 3, 3, 3]", "'model.layers.1.mlp.down_proj'", "out=64", "in=96"],
        None,
    ),
    "quantised_class": (
        {},
        ["'model.layers.1.self_attn.v_proj'", "FakeBnbLinear", "quantised", "not supported yet"],
        quantised_class_late,
    ),
    "int8_weight": ({}, ["'model.layers.1.mlp.up_proj'", "quantised", "not supported yet"], int8_weight_late),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_any_weight_changes(case):
    kwargs, fragments, mutate = BAD_INPUTS[case]
    model = tiny_llama()
    if mutate is not None:
        mutate(model)
    before = snapshot(model)
    with pytest.raises(ValueError) as excinfo:
        get_peft_model(model, SokaConfig(**{"max_rank": 4, "svd": "full", **kwargs}))
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert_state_unchanged(model, before)
    assert not soka_layers(model)


def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SOKA] is axolotl_soka.SokaModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SOKA] is SokaConfig
    axolotl_soka.register()  # idempotent
    assert SokaConfig().peft_type == PeftType.SOKA == "SOKA"
