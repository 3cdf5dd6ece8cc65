"""The chunked autograd function behind ``kron_apply``: chunk sizes, gradients, saved tensors, dtypes."""

import pytest
import torch

from axolotl_soka.kron import kron_apply
from axolotl_soka.kron.apply_autograd import CPU_CHUNK_BYTES, DEVICE_CHUNK_BYTES, chunk_tokens_for


def dense_kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_k torch.kron(A_k, B_k): the reference, independent of the code under test."""
    return sum(torch.kron(a[k], b[k]) for k in range(a.shape[0]))


# (m, n, p, q): B first, A first (the transposed path), a tie, LoRA-like and its twin
DIMS = [(8, 2, 2, 8), (2, 8, 8, 2), (4, 4, 4, 4), (3, 5, 7, 2), (5, 1, 1, 6), (1, 6, 5, 1)]
N_TOKENS = 11
CHUNKS = [1, 2, 3, 10, 11, 50]


def factors(dims, r, dtype=torch.float64, seed=0):
    m, n, p, q = dims
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, m, n, generator=g, dtype=dtype)
    b = torch.randn(r, p, q, generator=g, dtype=dtype)
    x = torch.randn(N_TOKENS, n * q, generator=g, dtype=dtype)
    up = torch.randn(N_TOKENS, m * p, generator=g, dtype=dtype)
    return x, a, b, up


def grads_of(fn, x0, a0, b0, up, need=(True, True, True)):
    x, a, b = (t.clone().requires_grad_(flag) for t, flag in zip((x0, a0, b0), need, strict=True))
    y = fn(x, a, b)
    (y * up).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dims", DIMS, ids=str)
def test_every_chunk_size_gives_the_dense_values_and_gradients(dims, chunk):
    x, a, b, up = factors(dims, r=3)
    got = grads_of(lambda x, a, b: kron_apply(x, a, b, chunk_tokens=chunk), x, a, b, up)
    want = grads_of(lambda x, a, b: x @ dense_kron_sum(a, b).T, x, a, b, up)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dims", [(8, 2, 2, 8), (2, 8, 8, 2)], ids=str)
def test_gradcheck_with_several_chunks(dims):
    x, a, b, _ = factors(dims, r=2)
    inputs = tuple(
        t[:5].clone().requires_grad_() if i == 0 else t.clone().requires_grad_()
        for i, t in enumerate((x, a, b))
    )
    assert torch.autograd.gradcheck(lambda x, a, b: kron_apply(x, a, b, chunk_tokens=2), inputs)


@pytest.mark.parametrize(
    "need", [(True, False, False), (False, True, True), (False, True, False), (False, False, True)], ids=str
)
@pytest.mark.parametrize("dims", [(8, 2, 2, 8), (2, 8, 8, 2)], ids=str)
def test_only_the_gradients_asked_for_are_computed(dims, need):
    x, a, b, up = factors(dims, r=2)
    got = grads_of(lambda x, a, b: kron_apply(x, a, b, chunk_tokens=4), x, a, b, up, need)
    want = grads_of(lambda x, a, b: x @ dense_kron_sum(a, b).T, x, a, b, up, need)
    for flag, g, w in zip(need, got[1:], want[1:], strict=True):
        if flag:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
        else:
            assert g is None


@pytest.mark.parametrize("dims", [(8, 2, 2, 8), (2, 8, 8, 2), (16, 16, 16, 16)], ids=str)
def test_backward_keeps_only_the_input_and_the_factors(dims):
    """The r·n·p-per-token intermediate is recomputed in backward, never saved."""
    x, a, b, _ = factors(dims, r=4, dtype=torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kron_apply(x, a, b)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {t.untyped_storage().data_ptr() for t in (x, a, b)}


def test_empty_input():
    x, a, b, _ = factors((4, 4, 4, 4), r=2)
    x = torch.zeros(0, 16, dtype=torch.float64, requires_grad=True)
    a.requires_grad_()
    y = kron_apply(x, a, b, chunk_tokens=3)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    torch.testing.assert_close(a.grad, torch.zeros_like(a), rtol=0, atol=0)


@pytest.mark.parametrize("dims", [(16, 16, 16, 16), (8, 32, 16, 8)], ids=str)
def test_bf16_values_and_gradients_within_rounding(dims):
    """bf16 inputs: values and gradients within bf16 rounding of the fp64 reference, with many chunks
    (the factor gradients are summed over chunks in fp32) as with one."""
    m, n, p, q = dims
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, m, n, generator=g, dtype=torch.float64) / n**0.5
    b = torch.randn(4, p, q, generator=g, dtype=torch.float64) / q**0.5
    x = torch.randn(256, n * q, generator=g, dtype=torch.float64)
    up = torch.randn(256, m * p, generator=g, dtype=torch.float64)
    want = grads_of(lambda x, a, b: x @ dense_kron_sum(a, b).T, x, a, b, up)
    for chunk in (1, 256):
        got = grads_of(
            lambda x, a, b, chunk=chunk: kron_apply(x, a, b, chunk_tokens=chunk),
            x.bfloat16(),
            a.bfloat16(),
            b.bfloat16(),
            up.bfloat16(),
        )
        for gt, w in zip(got, want, strict=True):
            assert gt.dtype == torch.bfloat16
            rel = (gt.double() - w).norm() / w.norm()
            assert rel < 2e-2, (chunk, float(rel))


def test_autocast_runs_in_the_autocast_dtype():
    x, a, b, up = factors((8, 4, 8, 4), r=2, dtype=torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kron_apply(x, a, b)
    assert y.dtype == torch.bfloat16
    (y.float() * up).sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
    want = grads_of(
        lambda x, a, b: x @ dense_kron_sum(a, b).T,
        x.detach().double(),
        a.detach().double(),
        b.double(),
        up.double(),
    )
    for got, ref in ((y.double(), want[0]), (x.grad.double(), want[1]), (a.grad.double(), want[2])):
        assert (got - ref).norm() / ref.norm() < 2e-2


def test_chunk_sizes_follow_the_byte_budgets():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # LLaMA 4096×4096, balanced 64-blocks, r = 8: 8·64·64 values per token
    assert chunk_tokens_for(8 * 64 * 64, torch.float32, cpu) == CPU_CHUNK_BYTES // (8 * 64 * 64 * 4) == 32
    assert (
        chunk_tokens_for(8 * 64 * 64, torch.bfloat16, cuda) == DEVICE_CHUNK_BYTES // (8 * 64 * 64 * 2) == 4096
    )
    assert chunk_tokens_for(10**9, torch.float32, cpu) == 1  # never zero


@pytest.mark.slow
def test_torch_compile_gives_the_same_gradients():
    """Axolotl's ``torch_compile: true`` traces the adapter: the function must compile and agree."""
    x, a, b, up = factors((8, 4, 8, 4), r=2, dtype=torch.float32)

    def loss(x, a, b):
        return (kron_apply(x, a, b, chunk_tokens=4) * up).sum()

    want = grads_of(lambda x, a, b: x @ dense_kron_sum(a, b).T, x, a, b, up)
    inputs = [t.clone().requires_grad_() for t in (x, a, b)]
    torch.compile(loss)(*inputs).backward()
    for got, ref in zip((t.grad for t in inputs), want[1:], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dims", [(8, 2, 2, 8), (2, 8, 8, 2), (5, 1, 1, 6)], ids=["b-first", "a-first", "lora-like"]
)
def test_compiled_graphs_hold_one_operator_each_way_not_the_chunk_loop(dims):
    """Compiled, the product is one opaque operator in the forward graph and one in the backward graph, where
    dynamo would otherwise unroll the chunk loop (3 chunks here) into separate products; values and
    gradients equal eager mode."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return make_boxed_func(gm.forward)

    x, a, b, up = factors(dims, r=3)

    def loss(x, a, b):
        return (kron_apply(x, a, b, chunk_tokens=4) * up).sum()

    eager = [t.clone().requires_grad_() for t in (x, a, b)]
    want = loss(*eager)
    want.backward()
    inputs = [t.clone().requires_grad_() for t in (x, a, b)]
    torch._dynamo.reset()
    compiled = torch.compile(
        loss, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True
    )
    got = compiled(*inputs)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    forward, backward = graphs
    assert forward.count("axolotl_soka.kron_apply.default") == 1
    assert backward.count("axolotl_soka.kron_apply_backward.default") == 1
    products = ("aten.mm.default", "aten.bmm.default", "aten.addmm.default", "aten.baddbmm.default")
    assert not [t for t in forward + backward if t in products]
    for got, want in zip(inputs, eager, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [0, -3])
def test_a_chunk_size_below_one_is_refused(chunk):
    x, a, b, _ = factors((4, 4, 4, 4), r=2)
    with pytest.raises(
        ValueError, match=rf"chunk_tokens must be a positive number of tokens \(or None\), got {chunk}"
    ):
        kron_apply(x, a, b, chunk_tokens=chunk)


@pytest.mark.parametrize(
    ("dims", "r"), [((12, 1, 1, 16), 4), ((1, 16, 12, 1), 3)], ids=["B-first", "A-first"]
)
def test_lora_like_shapes_keep_their_small_intermediate(dims, r):
    """With ``p = 1`` (``m = 1`` A-first) the ``r``-per-token intermediate is kept instead of recomputed,
    as LoRA keeps its rank-r activation; the values and gradients stay those of the dense product."""
    x, a, b, up = factors(dims, r=r)
    saved = []

    def apply(x, a, b):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            return kron_apply(x, a, b, chunk_tokens=4)

    got = grads_of(apply, x, a, b, up)
    inputs_and_factors = 3
    assert len(saved) == inputs_and_factors + 1
    assert saved[-1].shape == (N_TOKENS, r)  # tokens × r (n = 1 in the core orientation)
    want = grads_of(lambda x, a, b: x @ dense_kron_sum(a, b).T, x, a, b, up)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_a_lora_like_rank_too_large_for_the_input_recomputes():
    x, a, b, _ = factors((12, 1, 1, 8), r=3)  # 4·r > q: the intermediate is not small next to the input
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kron_apply(x, a.requires_grad_(), b)
    assert {t.untyped_storage().data_ptr() for t in saved} == {
        t.untyped_storage().data_ptr() for t in (x, a, b)
    }
