"""Factor-shape search: the shape whose top KPSVD terms keep the most of ‖M‖_F² within a parameter budget."""

import time

import pytest
import torch

from axolotl_soka.kron.rearrange import rearrange
from axolotl_soka.kron.shape_search import (
    ShapeCandidate,
    ShapeChoice,
    candidate_shapes,
    search_shape,
    spectrum_twin,
)
from axolotl_soka.kron.shapes import KronShape, balanced_shape, lora_shape


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def candidate_for(choice: ShapeChoice, shape: KronShape) -> ShapeCandidate:
    (found,) = [c for c in choice.candidates if c.shape == shape]
    return found


@pytest.mark.parametrize("svd", ["lowrank", "full"])
def test_single_kronecker_product_is_found_in_its_own_shape(svd):
    g = generator(0)
    a, b = torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g)
    matrix = torch.kron(a, b)  # (32, 32)
    shape = KronShape(8, 4, 4, 8)
    budget = shape.params_per_term + 1  # exactly one term of that shape (65 parameters)
    choice = search_shape(matrix, budget, svd=svd)
    assert choice.best.shape == shape
    assert choice.best.terms == 1
    assert choice.best.params == 65
    assert choice.best.energy_kept == pytest.approx(1.0, abs=1e-6)
    # the transposed-role shape has the same cost but not the same spectrum: A ⊗ B ≠ B ⊗ A in general
    swapped = candidate_for(choice, KronShape(4, 8, 8, 4))
    assert swapped.terms == 1
    assert swapped.energy_kept < 0.9
    # every other candidate keeps strictly less
    assert all(c.energy_kept < 1.0 - 1e-3 for c in choice.candidates[1:])


def test_transposed_role_shape_shares_the_spectrum_only_in_the_degenerate_family():
    matrix = torch.randn(12, 18, generator=generator(1), dtype=torch.float64)

    def spectrum(shape: KronShape) -> torch.Tensor:
        return torch.linalg.svdvals(rearrange(matrix, shape))

    # general shapes: (p, q, m, n) is a different spectrum, so it must be evaluated on its own
    for shape in [KronShape(2, 3, 6, 6), KronShape(3, 2, 4, 9), KronShape(6, 3, 2, 6)]:
        assert spectrum_twin(shape) == shape
        swapped = KronShape(shape.p, shape.q, shape.m, shape.n)
        assert not torch.allclose(spectrum(shape), spectrum(swapped), atol=1e-3)
    # (m = 1 or p = 1) and (n = 1 or q = 1): R of the twin is exactly the transpose
    for shape in [KronShape(12, 1, 1, 18), KronShape(12, 18, 1, 1)]:
        twin = spectrum_twin(shape)
        assert twin == KronShape(shape.p, shape.q, shape.m, shape.n)
        assert torch.equal(rearrange(matrix, twin), rearrange(matrix, shape).T)
        assert torch.allclose(spectrum(shape), spectrum(twin), atol=1e-10)


@pytest.mark.parametrize("svd", ["lowrank", "full"])
def test_rank_one_matrix_picks_the_lora_like_shape(svd):
    g = generator(2)
    out_features, in_features = 24, 40
    u, v = torch.randn(out_features, 1, generator=g), torch.randn(1, in_features, generator=g)
    budget = out_features + in_features + 1  # one LoRA-like term (u, vᵀ, σ)
    choice = search_shape(u @ v, budget, svd=svd)
    # the only shapes holding u vᵀ in one term are (out, 1, 1, in) and its twin (1, in, out, 1); the tie goes
    # to the squarer order of balanced_shape, which is the LoRA-like one (m·n = 24 < 40)
    assert choice.best.shape == lora_shape(out_features, in_features)
    assert choice.best.energy_kept == pytest.approx(1.0, abs=1e-6)
    twin = candidate_for(choice, KronShape(1, in_features, out_features, 1))
    assert twin.energy_kept == choice.best.energy_kept  # shared evaluation: a bit-exact tie
    assert choice.candidates[1] == twin
    balanced = candidate_for(choice, balanced_shape(out_features, in_features))
    assert balanced.terms >= 1
    assert balanced.energy_kept < 1.0 - 1e-3


def test_sum_of_two_kronecker_terms_plus_noise():
    g = generator(3)
    shape = KronShape(4, 8, 8, 4)
    matrix = torch.kron(torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g))
    matrix += 0.8 * torch.kron(torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g))
    matrix += 1e-3 * torch.randn(32, 32, generator=g)
    budget = 2 * (shape.params_per_term + 1)  # 130: two terms of (4, 8, 8, 4)
    choice = search_shape(matrix, budget)
    assert choice.best.shape == shape
    assert choice.best.terms == 2
    assert choice.best.params == 130
    assert choice.best.energy_kept > 0.9999
    assert choice.candidates[1].energy_kept < 0.99
    # candidates are reported best first, then by falling energy
    energies = [c.energy_kept for c in choice.candidates]
    assert energies[1:] == sorted(energies[1:], reverse=True)
    assert all(c.params <= budget for c in choice.candidates)


def test_terms_are_capped_by_budget_rank_and_max_terms():
    matrix = torch.randn(12, 18, generator=generator(4))
    choice = search_shape(matrix, budget=1000, max_terms=3)
    for c in choice.candidates:
        cost = c.shape.params_per_term + 1
        assert c.terms == min(1000 // cost, c.shape.max_rank, 3)
        assert c.params == c.terms * cost
    # (12, 1, 1, 18) costs 31 per term: 3 terms (max_terms); (2, 1, 6, 18) has Kronecker rank 2 at most
    assert candidate_for(choice, KronShape(12, 1, 1, 18)).terms == 3
    full_rank = candidate_for(choice, KronShape(2, 1, 6, 18))
    assert (full_rank.terms, full_rank.energy_kept) == (2, 1.0)  # the full Kronecker rank reproduces M


def test_full_budget_without_sigma_cost_prefers_fewest_parameters():
    # a budget large enough for an exact representation in many shapes: all tie at 1.0, fewest params win
    matrix = torch.randn(6, 4, generator=generator(5))
    choice = search_shape(matrix, budget=10_000, sigma_cost=0)
    exact = [c for c in choice.candidates if c.energy_kept == 1.0]
    assert len(exact) > 1
    assert choice.best.params == min(c.params for c in exact)


def test_candidate_enumeration_12x18():
    out_features, in_features, budget = 12, 18, 60
    shapes = candidate_shapes(out_features, in_features, budget)
    expected = [
        (m, n, out_features // m, in_features // n)
        for m in range(1, out_features + 1)
        if out_features % m == 0
        for n in range(1, in_features + 1)
        if in_features % n == 0
        if m * n + (out_features // m) * (in_features // n) + 1 <= budget
    ]
    assert [s.as_list() for s in shapes] == [list(e) for e in expected]
    # cost = x + 216/x + 1 with x = m·n: fits 60 for 4 ≤ x ≤ 54, i.e. 26 of the 6·6 = 36 factor pairs
    assert len(shapes) == len(expected) == 26
    for s in shapes:
        assert (s.m * s.p, s.n * s.q) == (out_features, in_features)
        assert s.params_per_term + 1 <= budget
    # an unlimited budget lists all 36 pairs; sigma_cost shifts the threshold by one
    assert len(candidate_shapes(out_features, in_features, 10**6)) == 36
    cheapest = balanced_shape(out_features, in_features).params_per_term
    assert candidate_shapes(out_features, in_features, cheapest) == []
    assert len(candidate_shapes(out_features, in_features, cheapest, sigma_cost=0)) >= 1


def test_budget_too_small_names_module_and_cost():
    matrix = torch.randn(12, 18, generator=generator(6))
    cheapest = balanced_shape(12, 18).params_per_term + 1
    with pytest.raises(ValueError) as info:
        search_shape(matrix, cheapest - 1, module_name="model.layers.0.mlp.up_proj")
    message = str(info.value)
    assert "model.layers.0.mlp.up_proj" in message
    assert "out=12" in message and "in=18" in message
    assert f"budget {cheapest - 1}" in message
    assert str(cheapest) in message
    assert search_shape(matrix, cheapest).best.params == cheapest


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": 100, "max_terms": 0}, "max_terms"),
        ({"budget": 100, "sigma_cost": -1}, "sigma_cost"),
        ({"budget": 100, "svd": "qr"}, "svd method"),
        ({"budget": 100, "niter": -1}, "niter"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    matrix = torch.randn(12, 18, generator=generator(7))
    with pytest.raises(ValueError, match=fragment):
        search_shape(matrix, **kwargs)


@pytest.mark.parametrize("bad", [torch.randn(12), torch.randn(2, 3, 4), [[1.0, 2.0]]])
def test_matrix_must_be_2d(bad):
    with pytest.raises(ValueError, match="2-D matrix.*'q_proj'"):
        search_shape(bad, 100, module_name="q_proj")


def test_non_finite_matrix_is_rejected():
    matrix = torch.randn(12, 18, generator=generator(8))
    matrix[3, 4] = float("nan")
    with pytest.raises(ValueError, match="'v_proj' has non-finite"):
        search_shape(matrix, 100, module_name="v_proj")


def test_same_seed_gives_identical_choice_and_scores():
    matrix = torch.randn(96, 128, generator=generator(9))
    budget = 4 * (96 + 128)
    first = search_shape(matrix, budget, seed=3)
    second = search_shape(matrix.clone(), budget, seed=3)
    assert first == second  # same shapes, terms, params and bit-identical scores, in the same order
    assert first.to_dict() == second.to_dict()
    assert len(first.candidates) == len(candidate_shapes(96, 128, budget))


def test_lowrank_scores_match_exact_scores_closely():
    g = generator(10)
    # a decaying spectrum in the LoRA-like shape, so the randomized SVD has something to find
    u, _ = torch.linalg.qr(torch.randn(96, 96, generator=g))
    v, _ = torch.linalg.qr(torch.randn(128, 96, generator=g))
    matrix = (u * torch.logspace(0, -3, 96)) @ v.T
    budget = 4 * (96 + 128)
    fast, exact = search_shape(matrix, budget, svd="lowrank"), search_shape(matrix, budget, svd="full")
    exact_by_shape = {c.shape: c.energy_kept for c in exact.candidates}
    for c in fast.candidates:
        assert c.energy_kept <= exact_by_shape[c.shape] + 1e-5
        assert c.energy_kept == pytest.approx(exact_by_shape[c.shape], abs=2e-2)
    assert fast.best.shape == exact.best.shape == lora_shape(96, 128)


@pytest.mark.parametrize(("out_features", "in_features"), [(576, 576), (1536, 576)])
def test_timing_report(out_features, in_features):
    """Prints (does not assert) the wall time at budget 8·(out + in); run with ``-s`` to see it."""
    matrix = torch.randn(out_features, in_features, generator=generator(11))
    budget = 8 * (out_features + in_features)
    start = time.perf_counter()
    choice = search_shape(matrix, budget)
    elapsed = time.perf_counter() - start
    print(
        f"\nsearch_shape {out_features}x{in_features} budget={budget}: {len(choice.candidates)} candidates, "
        f"{elapsed:.2f} s (torch threads={torch.get_num_threads()}); best {choice.best.shape.as_list()} "
        f"terms={choice.best.terms} energy={choice.best.energy_kept:.4f}"
    )
    assert choice.best.params <= budget
