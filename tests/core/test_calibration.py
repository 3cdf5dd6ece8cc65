"""Gradient calibration, ``init_source="gradient"``, ``init="gradient"`` and ``factor_shape="auto"`` on a tiny Llama."""

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import TINY_LLAMA
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from axolotl_soka import SokaConfig, SokaLayer, calibrate_gradients, export_delta_adapter
from axolotl_soka.kron import KronShape, energy_kept, kpsvd, rearrange
from axolotl_soka.tuner.calibration import CALIBRATION_ATTR

TARGETS = ["q_proj", "v_proj", "down_proj"]
PROBE = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(99))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def make_batches(count: int, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches with padding: the last 3 tokens of the second row are masked out of the loss."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 100, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def reference_gradients(model: LlamaForCausalLM, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean ``∂loss/∂W`` by plain autograd on the weights."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {
        name: module.weight for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS
    }
    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()
    return {name: w.grad / len(batches) for name, w in weights.items()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def test_calibration_equals_autograd_weight_gradients_and_restores_the_model():
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = make_batches(3)
    expected = reference_gradients(model, batches)
    model.train()
    result = calibrate_gradients(model, SokaConfig(target_modules=TARGETS), batches, progress=False)
    assert set(result.gradients) == set(expected) and len(expected) == 6
    for name, grad in expected.items():
        torch.testing.assert_close(result.gradients[name], grad, rtol=1e-4, atol=1e-7)
    assert result.batches == 3 and result.tokens == 3 * (11 + 8)
    assert 3.0 < result.mean_loss < 6.0  # near ln(100) for a random model
    assert model.training, "the model's train/eval mode was not restored"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()), "calibration left weight gradients behind"
    assert getattr(model, CALIBRATION_ATTR) is result


def test_calibration_is_reproducible():
    batches = make_batches(2)
    first = calibrate_gradients(tiny_llama(), SokaConfig(target_modules=TARGETS), batches, attach=False)
    second = calibrate_gradients(tiny_llama(), SokaConfig(target_modules=TARGETS), batches, attach=False)
    for name in first.gradients:
        assert torch.equal(first.gradients[name], second.gradients[name])


def calibrated(config: SokaConfig, batches: int = 2) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    original = tiny_llama()
    model = copy.deepcopy(original)
    calibrate_gradients(model, config, make_batches(batches), progress=False)
    return original, model


@pytest.mark.parametrize("sigma_mode", ["separate", "sqrt"])
def test_gradient_init_keeps_outputs_and_takes_the_gradient_directions(sigma_mode):
    config = SokaConfig(
        target_modules=TARGETS, init="gradient", svd="full", rank_pattern={"v_proj": 2}, max_rank=3,
        sigma_mode=sigma_mode,
    )  # fmt: skip
    original, model = calibrated(config)
    grads = {k: v.clone() for k, v in getattr(model, CALIBRATION_ATTR).gradients.items()}
    peft_model = get_peft_model(model, config)
    assert not hasattr(model, CALIBRATION_ATTR), "the calibration was not released after use"
    assert (logits(peft_model) - logits(original)).abs().max() <= 1e-5 * logits(original).abs().max()
    layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, SokaLayer) and layer.r["default"] == 2
    shape = layer.kshape["default"]
    expected = kpsvd(grads["model.layers.0.self_attn.v_proj"], shape, 2, method="full")
    a0, b0 = layer.soka_A0["default"], layer.soka_B0["default"]
    # the initial terms span the gradient's top-2 Kronecker components (up to the sign each term carries)
    for k in range(2):
        cos_a = torch.nn.functional.cosine_similarity(a0[k].flatten(), expected.A[k].flatten(), dim=0)
        cos_b = torch.nn.functional.cosine_similarity(b0[k].flatten(), expected.B[k].flatten(), dim=0)
        assert abs(float(cos_a)) > 1 - 1e-5 and abs(float(cos_b)) > 1 - 1e-5
    # coefficients as large as W's own Kronecker singular values (sign of W's projection)
    w = original.model.layers[0].self_attn.v_proj.weight
    w_top = kpsvd(w, shape, 2, method="full").S
    if sigma_mode == "separate":
        torch.testing.assert_close(layer.soka_s["default"].detach().abs(), w_top, rtol=1e-5, atol=1e-7)
    else:
        norms = layer.soka_A["default"].detach().flatten(1).norm(dim=1) ** 2  # √σ in A (unit-norm factors)
        torch.testing.assert_close(norms, w_top, rtol=1e-4, atol=1e-7)
    # residual + initial delta = original weight
    restored = layer.get_base_layer().weight + layer.init_delta_weight("default")
    torch.testing.assert_close(restored, original.model.layers[0].self_attn.v_proj.weight, rtol=0, atol=1e-5)
    decision = peft_model.base_model.soka_selections["default"]["model.layers.0.self_attn.v_proj"]
    assert decision.source == "gradient"
    assert decision.decision.energy_kept == pytest.approx(
        energy_kept(expected.S, expected.total_energy, 2), rel=1e-5
    )


def test_gradient_source_chooses_ranks_from_the_gradient_spectrum_with_weight_factors():
    config = SokaConfig(
        target_modules=TARGETS, init="kpsvd", init_source="gradient", svd="full", energy_threshold=0.5,
        elbow_mode="none", rank_combine="energy", max_rank=64,
    )  # fmt: skip
    original, model = calibrated(config)
    grads = {k: v.clone() for k, v in getattr(model, CALIBRATION_ATTR).gradients.items()}
    peft_model = get_peft_model(model, config)
    for name, sel in peft_model.base_model.soka_selections["default"].items():
        spectrum = kpsvd(grads[name], sel.shape, sel.shape.max_rank, method="full")
        shares = torch.cumsum(spectrum.S.double() ** 2, 0) / spectrum.total_energy
        assert sel.rank == int((shares < 0.5).sum()) + 1, name
    # factors are the weight's own top components: the step-0 outputs stay and A0 ⊗ B0 matches W's KPSVD
    assert (logits(peft_model) - logits(original)).abs().max() <= 1e-5 * logits(original).abs().max()
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    w = original.model.layers[1].mlp.down_proj.weight
    top = kpsvd(w, layer.kshape["default"], layer.r["default"], method="full")
    torch.testing.assert_close(layer.soka_s["default"].detach(), top.S, rtol=1e-5, atol=1e-6)


def trained_gradient_adapter() -> tuple[LlamaForCausalLM, PeftModel, torch.Tensor]:
    """``(original model, gradient-initialised PEFT model with changed σ, its logits)``."""
    config = SokaConfig(target_modules=TARGETS, init="gradient", svd="full", max_rank=2)
    original, model = calibrated(config)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for layer in peft_model.modules():
            if isinstance(layer, SokaLayer):
                layer.soka_s["default"].mul_(1.5).add_(0.3)  # stands in for training
    return original, peft_model, logits(peft_model)


def test_gradient_adapter_saves_and_loads_without_calibration(tmp_path):
    original, peft_model, trained = trained_gradient_adapter()
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (logits(loaded) - trained).abs().max() <= 1e-5 * trained.abs().max()
    assert (trained - logits(original)).abs().max() > 1e-3


def test_gradient_source_without_calibration_is_refused_before_any_change():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibrate_gradients"):
        get_peft_model(model, SokaConfig(target_modules=TARGETS, init="gradient"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_for_other_targets_is_refused():
    model = tiny_llama()
    calibrate_gradients(model, SokaConfig(target_modules=["q_proj"]), make_batches(1), progress=False)
    with pytest.raises(ValueError, match="no gradient for 4 target modules"):
        get_peft_model(model, SokaConfig(target_modules=TARGETS, init_source="gradient"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(init_source="task"), "init_source 'task' is unknown; allowed: weight, gradient"),
        (dict(init="gradient", init_source="weight"), "init_source must be 'gradient'"),
        (dict(init="svd"), "init 'svd' is unknown; allowed: kpsvd, zero, gradient"),
        (dict(factor_shape="square"), "allowed: balanced, lora, auto"),
    ],
)
def test_bad_calibration_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SokaConfig(**kwargs)


def test_calibration_needs_a_batch():
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_gradients(tiny_llama(), SokaConfig(target_modules=TARGETS), [], progress=False)


# ------------------------------------------------------------------ factor_shape: auto


def kron_model() -> LlamaForCausalLM:
    """A tiny Llama whose v_proj weights ``(32, 64)`` are exact Kronecker products in shape ``(4, 16, 8, 4)``."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        w = layer.self_attn.v_proj.weight  # (32, 64): kv heads 2 × head dim 16
        a, b = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
        with torch.no_grad():
            w.copy_(torch.kron(a, b))
    return model


def test_auto_shape_finds_the_kronecker_structure_of_the_weight():
    model = kron_model()
    cost = 4 * 16 + 8 * 4 + 1
    config = SokaConfig(
        target_modules=["v_proj"], factor_shape="auto", svd="full", param_budget=2 * cost, max_rank=4,
        min_rank=1,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    for sel in peft_model.base_model.soka_selections["default"].values():
        assert sel.shape == KronShape(4, 16, 8, 4), sel.shape_candidates
        assert sel.rank == 1 and sel.decision.energy_kept == pytest.approx(1.0, abs=1e-6)
        assert sel.shape_candidates[0]["shape"] == [4, 16, 8, 4]
    saved = peft_model.peft_config["default"]
    assert set(map(tuple, saved.shape_pattern.values())) == {(4, 16, 8, 4)}


def test_auto_shape_without_budget_uses_max_rank_balanced_terms():
    model = tiny_llama()
    config = SokaConfig(target_modules=["q_proj"], factor_shape="auto", svd="full", max_rank=2)
    peft_model = get_peft_model(model, config)
    for sel in peft_model.base_model.soka_selections["default"].values():
        # balanced 64×64 is (8, 8, 8, 8): 2 terms of 129 parameters make the module's budget
        assert sel.trainable_params <= 2 * 129
        w = rearrange(torch.zeros(64, 64), sel.shape)  # the chosen shape multiplies out
        assert w.shape == (sel.shape.m * sel.shape.n, sel.shape.p * sel.shape.q)


def test_auto_shape_with_a_budget_below_one_term_per_module_still_has_a_candidate():
    """A budget smaller than one balanced term per module: every module may still afford the cheapest shape;
    the global allocation then picks which modules get terms."""
    model = tiny_llama()
    # 6 targets; the cheapest term of a (32 or 64)×64 matrix costs 8·8 + 8·8 + 1 = 129 or 4·8 + 8·8 + 1 = 97
    config = SokaConfig(
        target_modules=TARGETS, factor_shape="auto", svd="full", param_budget=300, min_rank=0, max_rank=4,
        energy_threshold=1.0, elbow_mode="none",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    selections = peft_model.base_model.soka_selections["default"].values()
    total = sum(sel.trainable_params for sel in selections)
    assert 300 - 129 < total <= 300
    assert any(sel.rank == 0 for sel in selections) and any(sel.rank > 0 for sel in selections)


def test_gradient_adapter_exports_a_delta_for_the_untouched_model(tmp_path):
    _, peft_model, trained = trained_gradient_adapter()
    export_delta_adapter(peft_model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (logits(loaded) - trained).abs().max() <= 1e-5 * trained.abs().max()


def test_sqrt_mode_gradient_init_has_no_dead_terms():
    config = SokaConfig(target_modules=TARGETS, init="gradient", svd="full", max_rank=4, sigma_mode="sqrt")
    original, model = calibrated(config)
    peft_model = get_peft_model(model, config)
    for layer in peft_model.modules():
        if isinstance(layer, SokaLayer):
            a_norms = layer.soka_A["default"].detach().flatten(1).norm(dim=1)
            assert (a_norms >= 0.09 * a_norms.max()).all()  # |c| floored at 1 % of the largest: √ ≥ 10 %
    assert (logits(peft_model) - logits(original)).abs().max() <= 1e-5 * logits(original).abs().max()


def test_auto_shape_leaves_room_for_min_rank():
    """A shape that one term of fits best must not win when min_rank of its terms overflow the budget."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj):  # (64, 64) = (2, 64) ⊗ (32, 1) exactly
            with torch.no_grad():
                proj.weight.copy_(
                    torch.kron(torch.randn(2, 64, generator=g), torch.randn(32, 1, generator=g))
                )
    budget = 4 * 2 * 129  # two balanced (8, 8, 8, 8) terms per module; one [2, 64, 32, 1] term costs 161
    config = SokaConfig(
        target_modules=["q_proj", "o_proj"], factor_shape="auto", svd="full", min_rank=2, max_rank=4,
        param_budget=budget,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    selections = list(peft_model.base_model.soka_selections["default"].values())
    assert all(sel.rank >= 2 and sel.shape.params_per_term <= 128 for sel in selections)
    assert sum(sel.trainable_params for sel in selections) <= budget


class KeywordModel(nn.Module):
    """Calls its projection by keyword and changes the projection's output in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)
        self.drop = nn.Dropout(0.5)

    def forward(self, input_ids, labels, attention_mask=None):
        h = self.proj(input=self.embed(input_ids))
        h.mul_(2.0)
        logits = self.head(self.drop(h))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return SimpleNamespace(loss=loss)


def test_keyword_calls_in_place_outputs_and_per_module_modes():
    model = KeywordModel()
    model.train()
    model.drop.eval()  # a submodule in another mode than its parent
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    result = calibrate_gradients(
        model, SokaConfig(target_modules=["proj"]), [{"input_ids": ids, "labels": ids}], progress=False
    )
    assert model.training and not model.drop.training
    reference = KeywordModel()
    reference.eval()
    reference(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(result.gradients["proj"], reference.proj.weight.grad, rtol=1e-5, atol=1e-7)


def test_batch_without_labels_is_refused_with_a_message():
    with pytest.raises(ValueError, match="has no labels"):
        calibrate_gradients(
            tiny_llama(), SokaConfig(target_modules=TARGETS), [{"input_ids": PROBE}], progress=False
        )
