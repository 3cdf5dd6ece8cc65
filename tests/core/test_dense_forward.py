"""``kron_linear``: one GEMM on ``W + Σ A_k ⊗ B_k`` gives the values and gradients of the frozen layer plus the
factored product, saves no weight-sized tensor, and is chosen by a cost rule with known crossovers."""

import pytest
import torch
import torch.nn.functional as F

import axolotl_soka.kron.dense_forward as dense_module
from axolotl_soka.kron import dense_forward_pays, effective_weight, kron_apply, kron_delta, kron_linear

# (m, n, p, q, r): B-first, A-first (transposed core), LoRA-like in both orientations, square, r = 1
SHAPES = [
    (4, 3, 5, 2, 3),
    (1, 5, 7, 1, 3),
    (6, 1, 1, 7, 2),
    (1, 4, 6, 1, 2),
    (3, 4, 4, 3, 4),
    (5, 2, 3, 4, 1),
]


def factors(m, n, p, q, r, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m * p, n * q, generator=g, dtype=dtype)
    bias = torch.randn(m * p, generator=g, dtype=dtype)
    A = torch.randn(r, m, n, generator=g, dtype=dtype).requires_grad_()
    B = torch.randn(r, p, q, generator=g, dtype=dtype).requires_grad_()
    return weight, bias, A, B


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("chunk", [1, 3, None], ids=["chunk1", "chunk3", "chunk-default"])
def test_values_and_gradients_equal_the_layer_plus_the_factored_product(shape, with_bias, chunk):
    m, n, p, q, r = shape
    weight, bias, A, B = factors(m, n, p, q, r)
    bias = bias if with_bias else None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, n * q, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 5, m * p, generator=g, dtype=torch.float64)
    want = F.linear(x, weight, bias) + kron_apply(x, A, B, chunk_tokens=chunk)
    got = kron_linear(x, weight, bias, A, B, chunk_tokens=chunk)
    assert got.shape == (2, 5, m * p)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grads_want = torch.autograd.grad((want * up).sum(), (x, A, B))
    grads_got = torch.autograd.grad((got * up).sum(), (x, A, B))
    for a, b in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=[str(s) for s in SHAPES[:3]])
def test_gradcheck(shape):
    m, n, p, q, r = shape
    weight, bias, A, B = factors(m, n, p, q, r)
    x = torch.randn(4, n * q, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, A, B: kron_linear(x, weight, bias, A, B, chunk_tokens=3), (x, A, B)
    )


def test_only_the_needed_gradients_are_computed():
    weight, bias, A, B = factors(4, 3, 5, 2, 3)
    x = torch.randn(6, 6, dtype=torch.float64)  # the input needs no gradient
    B.requires_grad_(False)
    out = kron_linear(x, weight, bias, A, B)
    (dA,) = torch.autograd.grad(out.sum(), (A,))
    want = torch.autograd.grad((F.linear(x, weight, bias) + kron_apply(x, A, B)).sum(), (A,))[0]
    torch.testing.assert_close(dA, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_bytes", [1, 200, 4 * 2**20], ids=["one-row-blocks", "some-rows", "one-block"])
def test_effective_weight_equals_the_weight_plus_the_materialised_delta(monkeypatch, block_bytes):
    monkeypatch.setattr(dense_module, "_WEIGHT_BLOCK_BYTES", block_bytes)
    for m, n, p, q, r in SHAPES:
        weight, _, A, B = factors(m, n, p, q, r)
        got = effective_weight(weight, A.detach(), B.detach())
        torch.testing.assert_close(got, weight + kron_delta(A.detach(), B.detach()), rtol=0, atol=1e-12)


def test_bf16_effective_weight_is_summed_in_fp32_and_rounded_once():
    """The forward sees ``W + ΔW`` rounded to bf16 once per element, not ``ΔW`` rounded and then added."""
    weight, _, A, B = factors(8, 4, 4, 8, 3, dtype=torch.float32)
    weight = weight.bfloat16()
    got = effective_weight(weight, A.detach(), B.detach(), torch.bfloat16)
    assert got.dtype == torch.bfloat16
    want = (weight.float() + kron_delta(A.detach(), B.detach())).bfloat16()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_autocast_runs_in_the_autocast_dtype():
    weight, bias, A, B = factors(4, 3, 5, 2, 3, dtype=torch.float32)
    x = torch.randn(2, 7, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kron_linear(x, weight, bias, A, B)
    assert out.dtype == torch.bfloat16
    want = F.linear(x, weight + kron_delta(A, B), bias)
    assert float((out.float() - want).detach().norm() / want.detach().norm()) < 1e-2
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    dA = torch.autograd.grad(want.sum(), A)[0]
    assert float((A.grad - dA).norm() / dA.norm()) < 2e-2


def test_saves_no_weight_sized_tensor_for_backward():
    """Only the input, the layer's own weight and the two factors are kept: the effective weight is rebuilt in
    backward, so the saved bytes are those of the frozen layer alone plus the factors."""
    weight, bias, A, B = factors(8, 4, 8, 4, 2)
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kron_linear(x, weight, bias, A, B)
    ptrs = {t.data_ptr() for t in saved}
    assert ptrs == {x.data_ptr(), weight.data_ptr(), A.data_ptr(), B.data_ptr()}


def test_crossover_token_counts():
    # 4096² balanced at r = 8: 8·64·64·128 multiply-adds per token against 128·4096² to form W + ΔW
    assert dense_module.FORM_COST_PER_ELEMENT == 128
    assert not dense_forward_pays(511, 8, 64, 64, 64, 64)
    assert dense_forward_pays(512, 8, 64, 64, 64, 64)
    # LoRA-like (4096, 1, 1, 4096) at r = 8: 8·8192 per token, so only past 32,768 tokens
    assert not dense_forward_pays(32767, 8, 4096, 1, 1, 4096)
    assert dense_forward_pays(32768, 8, 4096, 1, 1, 4096)
    # decoding one token never pays
    assert not dense_forward_pays(1, 9, 86, 64, 128, 64)


def test_bad_arguments_are_refused():
    weight, bias, A, B = factors(4, 3, 5, 2, 3)
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weight of shape \[20, 5\] does not match the factors' \[20, 6\]"):
        kron_linear(x, weight[:, :5], bias, A, B)
    with pytest.raises(ValueError, match="gives no gradient to weight or bias"):
        kron_linear(x, weight.clone().requires_grad_(), bias, A, B)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive number"):
        kron_linear(x, weight, bias, A, B, chunk_tokens=0)


def test_layers_of_one_shape_share_the_cpu_workspace_without_mixing_up_their_weights():
    """On a CPU ``W + ΔW`` is built into one reused tensor per shape; two stacked layers of the same shape,
    forward and backward, still each see their own effective weight."""
    w1, b1, A1, B1 = factors(3, 3, 3, 3, 2, seed=1)
    w2, b2, A2, B2 = factors(3, 3, 3, 3, 2, seed=2)
    x = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 6, 9, dtype=torch.float64)
    got = kron_linear(kron_linear(x, w1, b1, A1, B1), w2, b2, A2, B2)
    want = F.linear(F.linear(x, w1 + kron_delta(A1, B1), b1), w2 + kron_delta(A2, B2), b2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    params = (x, A1, B1, A2, B2)
    for a, b in zip(
        torch.autograd.grad((got * up).sum(), params),
        torch.autograd.grad((want * up).sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    first = dense_module._transient_weight(w1, A1.detach(), B1.detach(), torch.float64)
    second = dense_module._transient_weight(w2, A2.detach(), B2.detach(), torch.float64)
    assert first.data_ptr() == second.data_ptr()  # one tensor per shape and dtype


def test_a_first_call_under_inference_mode_does_not_break_later_training_calls():
    """The reused CPU buffer is a normal tensor even when an inference-mode call made it."""
    weight, bias, A, B = factors(5, 2, 3, 4, 2, seed=3)  # a shape no other test uses
    x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        first = kron_linear(x.detach(), weight, bias, A.detach(), B.detach())
    out = kron_linear(x, weight, bias, A, B)
    torch.testing.assert_close(out.detach(), first, rtol=0, atol=0)
    (dA,) = torch.autograd.grad(out.sum(), (A,))
    want = torch.autograd.grad((F.linear(x, weight, bias) + kron_apply(x, A, B)).sum(), (A,))[0]
    torch.testing.assert_close(dA, want, rtol=0, atol=1e-12)
