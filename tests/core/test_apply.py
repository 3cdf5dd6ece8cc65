"""Applying ``Σ_k A_k ⊗ B_k`` to activations without forming it, and materialising it."""

import pytest
import torch

from axolotl_soka.kron import contraction_costs, kron_apply, kron_delta


def dense_kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_k torch.kron(A_k, B_k): the reference, independent of the code under test."""
    return sum(torch.kron(a[k], b[k]) for k in range(a.shape[0]))


# (m, n, p, q) and the order kron_apply takes: "B" first when its cost is ≤ that of "A" first
CASES = [
    ((8, 2, 2, 8), "B"),
    ((2, 8, 8, 2), "A"),
    ((4, 4, 4, 4), "B"),  # tie goes to B first
    ((8, 8, 12, 8), "A"),  # the tiny Llama's up_proj
    ((8, 8, 8, 12), "B"),  # its down_proj
    ((3, 5, 7, 2), "A"),
    ((1, 6, 5, 1), "A"),  # (1, in, out, 1): R(W) = Wᵀ
    ((5, 1, 1, 6), "B"),  # (out, 1, 1, in): LoRA-like, R(W) = W
]
LEADS = [(), (7,), (2, 3), (2, 3, 4)]


def test_contraction_costs_values():
    assert contraction_costs(8, 2, 2, 8) == (64, 256)
    assert contraction_costs(2, 8, 8, 2) == (256, 64)
    assert contraction_costs(4, 4, 4, 4) == (128, 128)
    assert contraction_costs(8, 8, 12, 8) == (1536, 1280)
    assert contraction_costs(8, 8, 8, 12) == (1280, 1536)
    assert contraction_costs(3, 5, 7, 2) == (175, 72)
    assert contraction_costs(1, 6, 5, 1) == (60, 11)
    assert contraction_costs(5, 1, 1, 6) == (11, 60)
    # LLaMA 4096×4096 with 64-blocks: 64·64·128 either way
    assert contraction_costs(64, 64, 64, 64) == (524288, 524288)


@pytest.mark.parametrize(("dims", "order"), CASES, ids=lambda v: str(v))
def test_cases_select_the_expected_order(dims, order):
    b_first, a_first = contraction_costs(*dims)
    assert ("B" if b_first <= a_first else "A") == order


@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("r", [1, 5])
@pytest.mark.parametrize(("dims", "order"), CASES, ids=lambda v: str(v))
def test_kron_apply_matches_dense_product(dims, order, r, lead):
    m, n, p, q = dims
    g = torch.Generator().manual_seed(hash((dims, r, lead)) % 2**31)
    a = torch.randn(r, m, n, generator=g, dtype=torch.float64)
    b = torch.randn(r, p, q, generator=g, dtype=torch.float64)
    x = torch.randn(*lead, n * q, generator=g, dtype=torch.float64)
    y = kron_apply(x, a, b)
    assert y.shape == (*lead, m * p)
    torch.testing.assert_close(y, x @ dense_kron_sum(a, b).T, rtol=0, atol=1e-10)
    torch.testing.assert_close(y, x @ kron_delta(a, b).T, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("dims", "order"), CASES[:4], ids=lambda v: str(v))
def test_kron_apply_fp32(dims, order):
    m, n, p, q = dims
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, m, n, generator=g)
    b = torch.randn(3, p, q, generator=g)
    x = torch.randn(2, 3, n * q, generator=g)
    torch.testing.assert_close(kron_apply(x, a, b), x @ dense_kron_sum(a, b).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dims", "order"), CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("r", [1, 5])
def test_kron_delta_is_the_sum_of_kronecker_products(dims, order, r):
    m, n, p, q = dims
    g = torch.Generator().manual_seed(r)
    a = torch.randn(r, m, n, generator=g, dtype=torch.float64)
    b = torch.randn(r, p, q, generator=g, dtype=torch.float64)
    delta = kron_delta(a, b)
    assert delta.shape == (m * p, n * q)
    torch.testing.assert_close(delta, dense_kron_sum(a, b), rtol=0, atol=1e-12)


def test_kron_apply_non_contiguous_input():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 8, 2, generator=g)
    b = torch.randn(2, 2, 8, generator=g)
    x = torch.randn(16, 5, generator=g).T  # (5, 16), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(kron_apply(x, a, b), x @ dense_kron_sum(a, b).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dims", "order"), CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("r", [1, 5])
def test_gradients_match_dense(dims, order, r):
    m, n, p, q = dims
    g = torch.Generator().manual_seed(2 + r)
    a0 = torch.randn(r, m, n, generator=g)
    b0 = torch.randn(r, p, q, generator=g)
    x0 = torch.randn(2, 3, n * q, generator=g)
    upstream = torch.randn(2, 3, m * p, generator=g)

    def grads(fn):
        a, b, x = (t.clone().requires_grad_(True) for t in (a0, b0, x0))
        (fn(x, a, b) * upstream).sum().backward()
        return x.grad, a.grad, b.grad

    factored = grads(kron_apply)
    dense = grads(lambda x, a, b: x @ dense_kron_sum(a, b).T)
    for got, want in zip(factored, dense, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
