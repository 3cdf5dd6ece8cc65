"""The Van Loan–Pitsianis rearrangement and the Kronecker-product SVD (KPSVD)."""

import importlib

import pytest
import torch

from axolotl_soka.kron import KronShape, fix_signs, kpsvd, randomized_svd, rearrange, rearrange_inverse

# the package re-exports the function ``kpsvd``, which shadows the submodule of the same name
kpsvd_module = importlib.import_module("axolotl_soka.kron.kpsvd")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weight(shape: KronShape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape.out_features, shape.in_features, generator=generator(seed), dtype=dtype)


def reconstruct(result) -> torch.Tensor:
    """Σ_k σ_k A_k ⊗ B_k with torch.kron (independent of the code under test)."""
    m, n = result.A.shape[1:]
    p, q = result.B.shape[1:]
    out = torch.zeros(m * p, n * q, dtype=result.A.dtype)
    for s, a, b in zip(result.S, result.A, result.B, strict=True):
        out += s * torch.kron(a, b)
    return out


SHAPES = [KronShape(4, 3, 5, 2), KronShape(8, 8, 12, 8), KronShape(3, 7, 2, 5), KronShape(6, 1, 1, 10)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rearrange_of_kron_is_outer_product_of_row_major_vecs(shape):
    g = generator(1)
    a = torch.randn(shape.m, shape.n, generator=g)
    b = torch.randn(shape.p, shape.q, generator=g)
    # every entry is the same single product a[i, j]·b[k, l], so the identity holds bit for bit
    assert torch.equal(rearrange(torch.kron(a, b), shape), torch.outer(a.flatten(), b.flatten()))


def test_rearrange_index_definition():
    shape = KronShape(3, 4, 5, 2)
    w = random_weight(shape)
    r = rearrange(w, shape)
    assert r.shape == (shape.m * shape.n, shape.p * shape.q)
    for i, j, a, b in [(0, 0, 0, 0), (2, 3, 4, 1), (1, 2, 3, 0), (2, 0, 1, 1)]:
        assert r[i * shape.n + j, a * shape.q + b] == w[i * shape.p + a, j * shape.q + b]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rearrange_inverse_round_trip_is_exact(shape):
    w = random_weight(shape, seed=2)
    r = rearrange(w, shape)
    assert torch.equal(rearrange_inverse(r, shape), w)
    # R only permutes entries: same multiset of values, hence the same Frobenius norm
    assert torch.equal(torch.sort(r.flatten()).values, torch.sort(w.flatten()).values)
    assert torch.linalg.norm(r).item() == pytest.approx(torch.linalg.norm(w).item(), rel=1e-6)


def test_degenerate_shapes_rearrange_to_w_and_w_transposed():
    w = torch.randn(6, 10, generator=generator(3))
    assert torch.equal(rearrange(w, KronShape(6, 1, 1, 10)), w)
    assert torch.equal(rearrange(w, KronShape(1, 10, 6, 1)), w.T)


def test_rearrange_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(6, 10\).*\[4, 3, 5, 2\]"):
        rearrange(torch.zeros(6, 10), KronShape(4, 3, 5, 2))
    with pytest.raises(ValueError, match=r"\[4, 3, 5, 2\]"):
        rearrange_inverse(torch.zeros(20, 10), KronShape(4, 3, 5, 2))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_full_rank_kpsvd_reconstructs_w(shape):
    w = random_weight(shape, seed=4)
    result = kpsvd(w, shape, shape.max_rank, method="full")
    assert result.rank == shape.max_rank
    torch.testing.assert_close(reconstruct(result), w, rtol=0, atol=1e-5)
    # factors have unit Frobenius norm and are orthonormal across terms
    vec_a = result.A.reshape(result.rank, -1)
    vec_b = result.B.reshape(result.rank, -1)
    eye = torch.eye(result.rank)
    torch.testing.assert_close(vec_a @ vec_a.T, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(vec_b @ vec_b.T, eye, rtol=0, atol=1e-5)
    assert torch.all(result.S[:-1] >= result.S[1:])


def test_truncation_error_is_the_tail_energy():
    shape = KronShape(8, 8, 12, 8)  # max rank 64
    w = random_weight(shape, seed=5)
    full = kpsvd(w, shape, shape.max_rank, method="full")
    assert full.total_energy == pytest.approx(float(w.double().pow(2).sum()), rel=1e-6)
    assert float(full.S.double().pow(2).sum()) == pytest.approx(full.total_energy, rel=1e-5)
    for r in (1, 2, 5, 17, 40, 63):
        result = kpsvd(w, shape, r, method="full")
        assert result.rank == r
        torch.testing.assert_close(result.S, full.S[:r], rtol=1e-6, atol=0)
        error2 = float((w.double() - reconstruct(result).double()).pow(2).sum())
        tail2 = float(full.S[r:].double().pow(2).sum())
        assert error2 == pytest.approx(tail2, rel=1e-4)


def test_rank_is_clipped_to_max_rank():
    shape = KronShape(2, 3, 4, 5)  # max rank min(6, 20) = 6
    result = kpsvd(random_weight(shape), shape, 100, method="full")
    assert result.rank == 6
    assert result.A.shape == (6, 2, 3)
    assert result.B.shape == (6, 4, 5)
    assert kpsvd(random_weight(shape), shape, 0, method="full").rank == 0


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_lora_like_shape_is_the_ordinary_svd(rank):
    out_features, in_features = 24, 16
    shape = KronShape(out_features, 1, 1, in_features)
    w = torch.randn(out_features, in_features, generator=generator(6))
    result = kpsvd(w, shape, rank, method="full")
    torch.testing.assert_close(result.S, torch.linalg.svdvals(w)[:rank], rtol=1e-5, atol=0)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    truncated = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close(reconstruct(result), truncated, rtol=0, atol=1e-5)


def test_plain_reshape_instead_of_rearrangement_does_not_reconstruct():
    shape = KronShape(4, 3, 5, 2)
    w = random_weight(shape, seed=7)
    # a full-rank "KPSVD" of the naive reshape: exact as a matrix factorisation, but its Kronecker sum is not W
    u, s, vh = torch.linalg.svd(w.reshape(shape.m * shape.n, shape.p * shape.q), full_matrices=False)
    wrong = sum(
        s[k] * torch.kron(u[:, k].reshape(shape.m, shape.n), vh[k].reshape(shape.p, shape.q))
        for k in range(s.numel())
    )
    relative_error = float(torch.linalg.norm(wrong - w) / torch.linalg.norm(w))
    assert relative_error > 0.5
    # whereas the rearrangement reconstructs it
    good = reconstruct(kpsvd(w, shape, shape.max_rank, method="full"))
    assert float(torch.linalg.norm(good - w) / torch.linalg.norm(w)) < 1e-6


def decaying_kron_weight(shape: KronShape, coeffs, noise: float, seed: int) -> torch.Tensor:
    g = generator(seed)
    w = torch.zeros(shape.out_features, shape.in_features)
    for c in coeffs:
        a = torch.randn(shape.m, shape.n, generator=g)
        b = torch.randn(shape.p, shape.q, generator=g)
        w += c * torch.kron(a / a.norm(), b / b.norm())
    return w + noise * torch.randn(w.shape, generator=g)


LOWRANK_SHAPE = KronShape(16, 16, 16, 16)  # max rank 256: rank 4 + oversample 10 stays randomized


@pytest.fixture
def count_randomized(monkeypatch):
    calls = []
    original = kpsvd_module.randomized_svd

    def spy(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kpsvd_module, "randomized_svd", spy)
    return calls


def test_lowrank_is_deterministic_per_seed(count_randomized):
    w = random_weight(LOWRANK_SHAPE, seed=8)
    first = kpsvd(w, LOWRANK_SHAPE, 4, method="lowrank", seed=0)
    second = kpsvd(w, LOWRANK_SHAPE, 4, method="lowrank", seed=0)
    other = kpsvd(w, LOWRANK_SHAPE, 4, method="lowrank", seed=1)
    assert count_randomized == [0, 0, 1]  # really the randomized path, with the seed passed through
    for name in ("A", "B", "S"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert not torch.equal(first.S, other.S)
    assert not torch.equal(first.A, other.A)


def test_lowrank_does_not_touch_the_global_rng():
    w = random_weight(LOWRANK_SHAPE, seed=9)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    kpsvd(w, LOWRANK_SHAPE, 4, method="lowrank", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_lowrank_recovers_top_singular_values_of_a_decaying_spectrum(count_randomized):
    coeffs = [10.0, 6.0, 3.5, 2.0, 1.0, 0.5]
    w = decaying_kron_weight(LOWRANK_SHAPE, coeffs, noise=1e-3, seed=10)
    full = kpsvd(w, LOWRANK_SHAPE, 6, method="full")
    fast = kpsvd(w, LOWRANK_SHAPE, 6, method="lowrank", seed=3)
    assert count_randomized == [3]
    torch.testing.assert_close(fast.S, full.S, rtol=1e-3, atol=0)
    assert fast.total_energy == full.total_energy
    # same components (signs are fixed, so the factors themselves agree), same best approximation
    torch.testing.assert_close(fast.A, full.A, rtol=0, atol=1e-3)
    torch.testing.assert_close(fast.B, full.B, rtol=0, atol=1e-3)
    torch.testing.assert_close(reconstruct(fast), reconstruct(full), rtol=0, atol=1e-4)


def test_lowrank_falls_back_to_full_when_not_cheaper(count_randomized):
    shape = KronShape(4, 4, 4, 4)  # max rank 16 ≤ 2·(rank + oversample)
    w = random_weight(shape, seed=11)
    fast = kpsvd(w, shape, 3, method="lowrank")
    full = kpsvd(w, shape, 3, method="full")
    assert count_randomized == []
    for name in ("A", "B", "S"):
        assert torch.equal(getattr(fast, name), getattr(full, name))


@pytest.mark.parametrize("method", ["full", "lowrank"])
def test_signs_are_fixed(method):
    w = random_weight(LOWRANK_SHAPE, seed=12)
    result = kpsvd(w, LOWRANK_SHAPE, 5, method=method)
    vec_a = result.A.reshape(result.rank, -1)
    largest = vec_a.gather(1, vec_a.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    assert torch.all(largest > 0)
    # flipping the input's sign flips B (σ ≥ 0 and A's sign convention are kept)
    flipped = kpsvd(-w, LOWRANK_SHAPE, 5, method=method)
    torch.testing.assert_close(flipped.S, result.S, rtol=1e-5, atol=0)
    torch.testing.assert_close(flipped.A, result.A, rtol=0, atol=1e-4)
    torch.testing.assert_close(flipped.B, -result.B, rtol=0, atol=1e-4)


def test_fix_signs_flips_pairs_jointly():
    u = torch.tensor([[1.0, -3.0], [-2.0, 1.0]])
    vh = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    fu, fvh = fix_signs(u, vh)
    assert torch.equal(fu, torch.tensor([[-1.0, 3.0], [2.0, -1.0]]))
    assert torch.equal(fvh, -vh)
    assert torch.equal(fu @ fvh, u @ vh)


def test_randomized_svd_shapes_and_orthonormality():
    m = torch.randn(40, 30, generator=generator(13))
    u, s, vh = randomized_svd(m, 5, seed=0)
    assert u.shape == (40, 5) and s.shape == (5,) and vh.shape == (5, 30)
    torch.testing.assert_close(u.T @ u, torch.eye(5), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.T, torch.eye(5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_input_is_decomposed_in_fp32(dtype):
    shape = KronShape(4, 3, 5, 2)
    w = random_weight(shape, seed=14).to(dtype)
    result = kpsvd(w, shape, 3, method="full")
    assert result.A.dtype == result.B.dtype == result.S.dtype == torch.float32
    reference = kpsvd(w.to(torch.float32), shape, 3, method="full")
    for name in ("A", "B", "S"):
        assert torch.equal(getattr(result, name), getattr(reference, name))
    assert result.total_energy == reference.total_energy


def test_unknown_svd_method_lists_allowed():
    shape = KronShape(4, 3, 5, 2)
    with pytest.raises(ValueError) as excinfo:
        kpsvd(random_weight(shape), shape, 2, method="qr")
    assert "'qr'" in str(excinfo.value)
    assert "full, lowrank" in str(excinfo.value)
