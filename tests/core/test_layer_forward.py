"""``SokaLinear.forward``: the adapter's product is added into the base output in place when that is safe,
out of place otherwise, with the same values and gradients either way; the dense forward; ``torch.compile``."""

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import axolotl_soka.tuner.layer as layer_module
from axolotl_soka import SokaConfig

IN_FEATURES, OUT_FEATURES = 24, 16


class OneLinear(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def soka_model(bias: bool, sigma_mode: str = "separate", **config: object) -> nn.Module:
    torch.manual_seed(0)
    config = SokaConfig(
        target_modules=["proj"], rank_pattern={"proj": 3}, alpha=0.7, sigma_mode=sigma_mode, **config
    )
    model = get_peft_model(OneLinear(bias), config).double()
    layer = model.base_model.model.proj
    with torch.no_grad():  # move the factors off their initial values so that every gradient is non-trivial
        for param in layer.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture
def paths(monkeypatch):
    """Records, per call of the layer's ``kron_apply``, whether it added in place."""
    taken: list[bool] = []
    original = layer_module.kron_apply

    def recording(*args, **kwargs):
        taken.append(kwargs.get("add_to") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module, "kron_apply", recording)
    return taken


def run(model: nn.Module, x: torch.Tensor, up: torch.Tensor) -> list[torch.Tensor]:
    """Output and the gradients of ``Σ out·up`` for the input and every trainable parameter."""
    x = x.clone().requires_grad_()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.grad = None
    out = model(x)
    (out * up).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in trainable]


def dense_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x·(W + alpha·Σ_k s_k A_k ⊗ B_k)ᵀ + bias`` with ``torch.kron``, in the factors' dtype."""
    layer = model.base_model.model.proj
    base = layer.get_base_layer()
    a, b = layer.effective_factors("default")
    delta = sum(torch.kron(a[k], b[k]) for k in range(a.shape[0])).to(base.weight.dtype)
    return nn.functional.linear(x, base.weight + layer.scaling["default"] * delta, base.bias)


@pytest.mark.parametrize(
    ("bias", "lead", "adds_in_place"),
    [(False, (2, 5), True), (True, (7,), True), (True, (2, 5), True), (True, (2, 3, 5), True)],
    ids=["no-bias-3d", "bias-2d", "bias-3d-flattened", "bias-4d-flattened"],
)
@pytest.mark.parametrize("sigma_mode", ["separate", "sqrt"])
def test_both_paths_give_the_dense_values_and_the_same_gradients(
    paths, monkeypatch, bias, lead, adds_in_place, sigma_mode
):
    model = soka_model(bias, sigma_mode)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, IN_FEATURES, generator=g, dtype=torch.float64)
    up = torch.randn(*lead, OUT_FEATURES, generator=g, dtype=torch.float64)
    got = run(model, x, up)
    assert paths == [adds_in_place]
    torch.testing.assert_close(got[0], dense_reference(model, x), rtol=0, atol=1e-12)
    monkeypatch.setattr(layer_module.SokaLinear, "_adds_in_place", lambda self, result, dtype: False)
    want = run(model, x, up)
    assert paths == [adds_in_place, False]
    assert len(got) == len(want) == (5 if sigma_mode == "separate" else 4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_forward_hook_on_the_base_layer_sees_the_base_output(paths):
    """A hook may keep the base layer's output: then it is not modified afterwards."""
    model = soka_model(bias=False)
    base = model.base_model.model.proj.get_base_layer()
    kept = []
    base.register_forward_hook(lambda module, args, output: kept.append(output))
    x = torch.randn(3, IN_FEATURES, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    assert paths == [False]
    torch.testing.assert_close(kept[0], base(x), rtol=0, atol=0)
    torch.testing.assert_close(out, dense_reference(model, x), rtol=0, atol=1e-12)


def test_autocast_adds_in_place_in_the_autocast_dtype(paths):
    model = soka_model(bias=False).float()
    x = torch.randn(2, 5, IN_FEATURES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert paths == [True]
    assert out.dtype == torch.bfloat16
    want = dense_reference(model, x)
    assert float((out.float() - want).norm() / want.norm()) < 1e-2


def _zero3_like(hook, module: str):
    hook.__module__ = module
    return hook


def _nvtx_wrapped(func):
    """Like DeepSpeed's ``instrument_w_nvtx``: a wrapper without ``functools.wraps``."""

    def wrapped_fn(*args, **kwargs):
        return func(*args, **kwargs)

    wrapped_fn.__module__ = "deepspeed.utils.nvtx"
    return wrapped_fn


@pytest.mark.parametrize(
    ("wrap", "adds_in_place"),
    [
        (lambda hook: _zero3_like(hook, "deepspeed.runtime.zero.parameter_offload"), True),
        (lambda hook: _nvtx_wrapped(_zero3_like(hook, "deepspeed.runtime.zero.parameter_offload")), True),
        (lambda hook: _nvtx_wrapped(hook), False),
        (lambda hook: _zero3_like(hook, "deepspeed.runtime.pipe.module"), False),
    ],
    ids=["zero3", "zero3-in-nvtx", "other-in-nvtx", "other-deepspeed"],
)
@pytest.mark.parametrize(("bias", "lead"), [(False, (3,)), (True, (2, 3))], ids=["no-bias-2d", "bias-3d"])
def test_deepspeed_zero3_hooks_keep_the_in_place_path(paths, wrap, adds_in_place, bias, lead):
    """ZeRO-3 hooks every module (pre- and post-forward) to fetch and release its weight; they keep no output
    and do not depend on the input's shape, so the sum stays in place under ZeRO-3, for a biased layer on 3-d
    input too (run flattened). Any other hook takes the out-of-place path, on the caller's input."""
    model = soka_model(bias=bias)
    base = model.base_model.model.proj.get_base_layer()
    seen: list[tuple[int, ...]] = []

    def pre_hook(module, args):
        seen.append(tuple(args[0].shape))

    def hook(module, args, output):
        return None

    base.register_forward_pre_hook(wrap(pre_hook))
    base.register_forward_hook(wrap(hook))
    x = torch.randn(*lead, IN_FEATURES, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    assert paths == [adds_in_place]
    flattened = bias and adds_in_place
    assert seen == [(math.prod(lead), IN_FEATURES) if flattened else (*lead, IN_FEATURES)]
    assert out.shape == (*lead, OUT_FEATURES)
    torch.testing.assert_close(out, dense_reference(model, x), rtol=0, atol=1e-12)


def test_a_biased_layer_with_a_user_hook_is_called_on_the_callers_input(paths):
    """A hook other than ZeRO-3's may depend on the input's shape: the biased layer on 3-d input is then
    not flattened (and its view output takes the out-of-place sum)."""
    model = soka_model(bias=True)
    base = model.base_model.model.proj.get_base_layer()
    seen: list[tuple[int, ...]] = []
    base.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    x = torch.randn(2, 5, IN_FEATURES, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    assert seen == [(2, 5, IN_FEATURES)]
    assert paths == [False]
    torch.testing.assert_close(out, dense_reference(model, x), rtol=0, atol=1e-12)


def test_chunk_tokens_reaches_the_product_and_is_saved(monkeypatch, tmp_path):
    chunks: list[int | None] = []
    original = layer_module.kron_apply

    def recording(*args, **kwargs):
        chunks.append(kwargs.get("chunk_tokens"))
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module, "kron_apply", recording)
    torch.manual_seed(0)
    config = SokaConfig(target_modules=["proj"], rank_pattern={"proj": 3}, chunk_tokens=2)
    model = get_peft_model(OneLinear(bias=False), config)
    x = torch.randn(2, 5, IN_FEATURES)
    with torch.no_grad():
        out = model(x)
    assert chunks == [2]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["chunk_tokens"] == 2
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(OneLinear(bias=False), tmp_path)
    assert loaded.base_model.model.proj.chunk_tokens == {"default": 2}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=1e-5, atol=1e-6)
    assert chunks == [2, 2]


# ---------------------------------------------------------------------------------------------- dense forward
def dense_model(bias: bool, sigma_mode: str = "separate", dropout: float = 0.0) -> nn.Module:
    return soka_model(bias, sigma_mode, dropout=dropout, forward_mode="dense")


@pytest.fixture
def dense_calls(monkeypatch):
    """Counts the layer's calls of ``kron_linear`` (the dense forward)."""
    calls: list[int] = []
    original = layer_module.kron_linear

    def recording(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module, "kron_linear", recording)
    return calls


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("sigma_mode", ["separate", "sqrt"])
def test_dense_forward_gives_the_factored_values_and_gradients(paths, dense_calls, bias, sigma_mode):
    dense = dense_model(bias, sigma_mode)
    factored = soka_model(bias, sigma_mode)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, IN_FEATURES, generator=g, dtype=torch.float64)  # 256 tokens: dense pays
    up = torch.randn(4, 64, OUT_FEATURES, generator=g, dtype=torch.float64)
    got = run(dense, x, up)
    assert dense_calls == [1] and paths == []
    want = run(factored, x, up)
    assert dense_calls == [1] and len(paths) == 1
    torch.testing.assert_close(got[0], dense_reference(dense, x), rtol=0, atol=1e-12)
    assert len(got) == len(want) == (5 if sigma_mode == "separate" else 4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dense_forward_falls_back_to_the_factored_product(paths, dense_calls):
    """Too few tokens for it to pay, a hook or a replaced forward on the base, active dropout, or the mode
    switched off: factored."""
    model = dense_model(bias=False)
    layer = model.base_model.model.proj
    shape = layer.kshape["default"]
    assert not layer_module.dense_forward_pays(1, 3, shape.m, shape.n, shape.p, shape.q)
    assert layer_module.dense_forward_pays(256, 3, shape.m, shape.n, shape.p, shape.q)
    with torch.no_grad():
        one = torch.randn(1, IN_FEATURES, dtype=torch.float64)
        torch.testing.assert_close(model(one), dense_reference(model, one), rtol=0, atol=1e-12)
        assert dense_calls == [] and len(paths) == 1
        x = torch.randn(256, IN_FEATURES, dtype=torch.float64)
        model(x)
        assert dense_calls == [1]
        handle = layer.get_base_layer().register_forward_pre_hook(lambda module, args: None)
        torch.testing.assert_close(model(x), dense_reference(model, x), rtol=0, atol=1e-12)
        assert dense_calls == [1] and len(paths) == 2
        handle.remove()
        handle = layer.get_base_layer().register_full_backward_hook(lambda module, gin, gout: None)
        model(x)
        assert dense_calls == [1] and len(paths) == 3  # skipping the base's forward would skip its hook
        handle.remove()
        base = layer.get_base_layer()
        base.forward = lambda inp: nn.Linear.forward(
            base, inp
        )  # as accelerate's hooks replace it per instance
        torch.testing.assert_close(model(x), dense_reference(model, x), rtol=0, atol=1e-12)
        assert dense_calls == [1] and len(paths) == 4
        del base.forward
        layer.forward_mode["default"] = "factored"
        model(x)
        assert dense_calls == [1] and len(paths) == 5

    with_dropout = dense_model(bias=False, dropout=0.5)
    x = torch.randn(256, IN_FEATURES, dtype=torch.float64)
    with_dropout.train()
    with_dropout(x)
    assert dense_calls == [1] and len(paths) == 6  # the adapter sees dropout(x), the base x: not one GEMM
    with_dropout.eval()
    with torch.no_grad():
        torch.testing.assert_close(with_dropout(x), dense_reference(with_dropout, x), rtol=0, atol=1e-12)
    assert dense_calls == [1, 1]


def test_forward_mode_is_saved_and_loaded(tmp_path, dense_calls):
    torch.manual_seed(0)
    config = SokaConfig(target_modules=["proj"], rank_pattern={"proj": 3}, forward_mode="dense")
    model = get_peft_model(OneLinear(bias=True), config)
    x = torch.randn(4, 64, IN_FEATURES)
    with torch.no_grad():
        out = model(x)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["forward_mode"] == "dense"
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(OneLinear(bias=True), tmp_path)
    assert loaded.base_model.model.proj.forward_mode == {"default": "dense"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=1e-5, atol=1e-6)
    assert dense_calls == [1, 1]


# ----------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("forward_mode", ["factored", "dense"])
def test_fullgraph_compile_matches_eager(forward_mode):
    """``torch.compile(..., fullgraph=True)`` (Axolotl's ``torch_compile: true``) traces the layer without graph
    breaks and gives the eager values and gradients; a biased layer on 3-d input, which the factored forward
    flattens (the Llama test below has no biases)."""
    model = soka_model(bias=True, forward_mode=forward_mode)
    module = model.base_model.model  # the adapted module itself; PeftModel's own wrapper is PEFT's code
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 600, IN_FEATURES, generator=g, dtype=torch.float64)  # enough tokens for dense to pay
    up = torch.randn(2, 600, OUT_FEATURES, generator=g, dtype=torch.float64)
    if forward_mode == "dense":
        assert module.proj._dense_adapter(x) == "default"
    want = run(module, x, up)
    torch._dynamo.reset()
    got = run(torch.compile(module, fullgraph=True), x, up)
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_compiled_dense_mode_keeps_no_weight_sized_tensor_for_backward(monkeypatch):
    """Under ``torch.compile`` the dense forward runs as an opaque operator, forward and backward, and keeps no
    weight-sized tensor but the weight itself for backward. Traced instead, ``W + ΔW`` was kept (a weight-sized
    tensor per layer); the values and gradients equal eager mode."""
    import axolotl_soka.kron.dense_forward_op as dense_op

    calls = {"forward": 0, "backward": 0}
    for name, fn in (
        ("forward", dense_op.dense_linear_forward),
        ("backward", dense_op.dense_linear_backward),
    ):
        monkeypatch.setattr(dense_op, f"dense_linear_{name}", counted(calls, name, fn))
    model = soka_model(bias=True, forward_mode="dense")
    module = model.base_model.model
    weight = module.proj.get_base_layer().weight
    x = torch.randn(2, 600, IN_FEATURES, dtype=torch.float64, requires_grad=True)
    assert module.proj._dense_adapter(x) == "default"  # eager: the dense forward
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            saved.append(tuple(t.shape))
        return t

    up = torch.randn(2, 600, OUT_FEATURES, dtype=torch.float64)
    want = module(x) * up
    want.sum().backward()
    leaves = (x, *module.proj.soka_A.values(), *module.proj.soka_B.values())
    want_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    calls.update(forward=0, backward=0)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x) * up
    out.sum().backward()
    assert calls == {"forward": 1, "backward": 1}, "the compiled layer did not run the dense operators"
    assert saved, "nothing saved: the hook saw no compiled graph"
    assert all(math.prod(shape) != OUT_FEATURES * IN_FEATURES for shape in saved), saved
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for t, ref in zip(leaves, want_grads, strict=True):
        torch.testing.assert_close(t.grad, ref, rtol=1e-10, atol=1e-10)


def counted(calls: dict[str, int], name: str, fn):
    """``fn`` that counts its calls in ``calls[name]``."""

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.slow
@pytest.mark.parametrize("forward_mode", ["factored", "dense"])
def test_a_llama_with_soka_compiles_to_one_graph(forward_mode):
    """A whole (tiny) Llama with SoKA on attention and MLP projections: one graph, no breaks, and the
    compiled loss equals the eager one."""
    from tiny_models import TINY_LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = SokaConfig(
        target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={".*": 2}, forward_mode=forward_mode
    )
    module = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), config).base_model.model
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 300), generator=torch.Generator().manual_seed(1))
    want = module(input_ids=ids, labels=ids).loss
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(input_ids=ids, labels=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    got = torch.compile(module, fullgraph=True)(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("forward_mode", ["factored", "dense"])
def test_compiled_with_dynamic_shapes_new_sequence_lengths_reuse_the_graph(forward_mode):
    """Compiled with dynamic shapes, the operators' fake implementations take a symbolic token count: a new
    sequence length (as Axolotl's batches have) reuses the compiled frame instead of recompiling, on a
    biased layer (flattened input) in both forward modes (lengths past the dense forward's threshold)."""
    model = soka_model(bias=True, forward_mode=forward_mode)
    module = model.base_model.model
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")  # dynamo and the fakes, no codegen
    dynamic = torch.compile(module, backend=counter, dynamic=True)
    frames, g = [], torch.Generator().manual_seed(2)
    for length in (300, 333):
        x = torch.randn(2, length, IN_FEATURES, dtype=torch.float64, generator=g)
        assert module.proj._dense_adapter(x) == ("default" if forward_mode == "dense" else None)
        torch.testing.assert_close(dynamic(x), module(x), rtol=1e-12, atol=1e-12)
        frames.append(counter.frame_count)
    assert frames == [1, 1], f"a new sequence length recompiled: {frames} frames"


@pytest.mark.parametrize("merge", [True, False], ids=["merge_and_unload", "unload"])
def test_unloading_frees_the_dense_forwards_cpu_workspace(merge):
    """The dense forward's reused ``W + ΔW`` buffer (CPU) is freed once SoKA is merged or unloaded."""
    from axolotl_soka.kron import dense_forward

    dense_forward.release_workspace()
    model = soka_model(bias=True, forward_mode="dense")
    x = torch.randn(2, 600, IN_FEATURES, dtype=torch.float64)
    assert model.base_model.model.proj._dense_adapter(x) == "default"
    with torch.no_grad():
        want = model(x)
    assert list(dense_forward._WORKSPACE.tensors) == [((OUT_FEATURES, IN_FEATURES), torch.float64)]
    plain = model.merge_and_unload() if merge else model.unload()
    assert dense_forward._WORKSPACE.tensors == {}
    assert type(plain.proj) is nn.Linear
    if merge:
        with torch.no_grad():
            torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-6)  # the merge sums ΔW in fp32
