"""``kron_apply(..., add_to=base)``: the product added in place into a caller's output, with autograd."""

import pytest
import torch

from axolotl_soka.kron import kron_apply

# (m, n, p, q): B first, A first (the transposed path), a tie, LoRA-like and its twin
DIMS = [(8, 2, 2, 8), (2, 8, 8, 2), (4, 4, 4, 4), (3, 5, 7, 2), (5, 1, 1, 6), (1, 6, 5, 1)]
N_TOKENS = 11


def dense_kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_k torch.kron(A_k, B_k): the reference, independent of the code under test."""
    return sum(torch.kron(a[k], b[k]) for k in range(a.shape[0]))


def tensors(dims, r=3, dtype=torch.float64, seed=0, lead=(N_TOKENS,)):
    """``x: (*lead, n·q)``, ``a: (r, m, n)``, ``b: (r, p, q)``, ``base: (*lead, m·p)``, upstream gradient."""
    m, n, p, q = dims
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n * q, generator=g, dtype=dtype)
    a = torch.randn(r, m, n, generator=g, dtype=dtype)
    b = torch.randn(r, p, q, generator=g, dtype=dtype)
    base = torch.randn(*lead, m * p, generator=g, dtype=dtype)
    up = torch.randn(*lead, m * p, generator=g, dtype=dtype)
    return x, a, b, base, up


def values_and_grads(fn, leaves, up):
    """``fn(*leaves)`` and the gradients of ``Σ fn·up`` for every leaf (fresh copies requiring grad)."""
    leaves = [t.clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    (y * up).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


def in_place(chunk=None):
    """``2·base0 + x·ΔWᵀ`` with the product added in place into the (non-leaf) ``2·base0``."""

    def fn(x, a, b, base0):
        base = base0 * 2.0
        out = kron_apply(x, a, b, chunk_tokens=chunk, add_to=base)
        assert out is base
        return out

    return fn


def dense(x, a, b, base0):
    return base0 * 2.0 + x @ dense_kron_sum(a, b).T


@pytest.mark.parametrize("chunk", [1, 3, 50])
@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_adds_in_place_with_the_dense_values_and_gradients(dims, chunk):
    x, a, b, base, up = tensors(dims)
    got = values_and_grads(in_place(chunk), (x, a, b, base), up)
    want = values_and_grads(dense, (x, a, b, base), up)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dims", [(4, 3, 2, 5), (2, 5, 4, 3)], ids=str)
def test_leading_batch_dimensions(dims):
    x, a, b, base, up = tensors(dims, lead=(2, 5))
    got = values_and_grads(in_place(chunk=4), (x, a, b, base), up)
    want = values_and_grads(dense, (x, a, b, base), up)
    assert got[0].shape == (2, 5, dims[0] * dims[2])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dims", [(8, 2, 2, 8), (2, 8, 8, 2)], ids=str)
def test_gradcheck(dims):
    x, a, b, base, _ = tensors(dims, r=2, lead=(5,))
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, b, base))
    assert torch.autograd.gradcheck(in_place(chunk=2), inputs)


def test_the_tensor_is_changed_in_place_without_autograd():
    x, a, b, base, _ = tensors((4, 4, 4, 4))
    target = base.clone()
    with torch.no_grad():
        out = kron_apply(x, a, b, add_to=target)
    assert out is target
    torch.testing.assert_close(target, base + x @ dense_kron_sum(a, b).T, rtol=0, atol=1e-10)


def test_an_add_to_that_autograd_still_needs_is_caught():
    """``exp`` keeps its output for backward: adding into it must fail loudly, not give wrong gradients."""
    x, a, b, base, up = tensors((4, 4, 4, 4))
    base = base.requires_grad_()
    out = kron_apply(x, a, b, add_to=base.exp())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out * up).sum().backward()


def test_autocast_needs_an_add_to_of_the_autocast_dtype():
    x, a, b, base, up = tensors((8, 4, 8, 4), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kron_apply(x, a, b, add_to=base.to(torch.bfloat16))
        with pytest.raises(ValueError, match="add_to must be a contiguous torch.bfloat16 tensor"):
            kron_apply(x, a, b, add_to=base)
    want = base.double() + x.double() @ dense_kron_sum(a.double(), b.double()).T
    assert out.dtype == torch.bfloat16
    assert float((out.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize(
    ("make", "described"),
    [
        (lambda base: base[:, :-1].contiguous(), r"a contiguous torch.float64 tensor of shape \[11, 15\]"),
        (lambda base: base.float(), r"a contiguous torch.float32 tensor of shape \[11, 16\]"),
        (lambda base: base.T.contiguous().T, r"a non-contiguous torch.float64 tensor of shape \[11, 16\]"),
    ],
    ids=["shape", "dtype", "layout"],
)
def test_a_mismatched_add_to_is_refused_before_anything_is_written(make, described):
    x, a, b, base, _ = tensors((4, 4, 4, 4))
    target = make(base)
    before = target.clone()
    with pytest.raises(
        ValueError,
        match=rf"add_to must be a contiguous torch.float64 tensor of shape \[11, 16\], got {described}",
    ):
        kron_apply(x, a, b, add_to=target)
    assert torch.equal(target, before)


@pytest.mark.slow
def test_torch_compile_gives_the_same_gradients():
    """Axolotl's ``torch_compile: true`` traces the layer, whose product is added in place."""
    x, a, b, base, up = tensors((8, 4, 8, 4), dtype=torch.float32)

    def loss(x, a, b, base0):
        return (in_place(chunk=4)(x, a, b, base0) * up).sum()

    want = values_and_grads(dense, (x, a, b, base), up)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, base)]
    torch.compile(loss)(*leaves).backward()
    for got, ref in zip((t.grad for t in leaves), want[1:], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
