"""Choose the Kronecker factor shape ``(m, n, p, q)`` of one module from its matrix and a parameter budget.

For a matrix ``M: (out, in)`` (a weight or an accumulated gradient) and a per-module budget of ``b`` trainable
parameters, every shape with ``m·p = out`` and ``n·q = in`` is a candidate. One term costs
``c = m·n + p·q + sigma_cost`` parameters, so a candidate gets ``r = min(b // c, min(m·n, p·q), max_terms)``
terms and is scored by the share of ``‖M‖_F²`` its best ``r`` terms hold (Eckart–Young on ``R(M)``)::

    score(m, n, p, q) = Σ_{k≤r} σ_k(R(M))² / ‖M‖_F²

The highest score wins. Scores within ``1e-9`` (relative) of the best are ties, broken by fewer parameters
``r·c`` and then by the :func:`~axolotl_soka.kron.shapes.balanced_shape` ordering (most square factors).

Cost. ``out`` and ``in`` have ``d(out)·d(in)`` factor pairs (``d`` = number of divisors; 13×13 = 169 for
4096×4096, 21×21 = 441 for 576×576, fewer once the budget filter drops the expensive ones). Each surviving
candidate costs one top-``r`` SVD of ``R(M)``, which has the ``out·in`` entries of ``M``: randomized
(``O(out·in·(r + oversample)·(2·niter + 2))``) or, when ``R(M)`` is small, exact. So the search is about
``#candidates`` randomized SVDs of a matrix the size of ``M``, a one-off cost per module at setup.

Shapes whose spectra coincide. It is tempting to evaluate ``(m, n, p, q)`` and the transposed-role shape
``(p, q, m, n)`` once, but that is wrong in general: ``R_{(p,q,m,n)}(M) = R_{(m,n,p,q)}(P M Q)ᵀ`` for the
perfect-shuffle permutations ``P, Q`` (``B ⊗ A = P (A ⊗ B) Q``), not of ``M`` itself; ``A ⊗ B`` has one term
in ``(m, n, p, q)`` but generally many in ``(p, q, m, n)``. The shuffles are identities only when
``(m = 1 or p = 1)`` and ``(n = 1 or q = 1)``; then ``R_{(p,q,m,n)}(M) = R_{(m,n,p,q)}(M)ᵀ`` exactly (e.g. the
LoRA-like ``(out, 1, 1, in)``, where ``R(M) = M``, and ``(1, in, out, 1)``, where ``R(M) = Mᵀ``). Only those
pairs share one evaluation, which also makes their tie bit-exact rather than decided by SVD noise.

A candidate whose ``r`` reaches the full Kronecker rank ``min(m·n, p·q)`` represents ``M`` exactly: it scores
``1.0`` without an SVD.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .kpsvd import SVD_METHODS, kpsvd
from .rank import energy_kept
from .shapes import KronShape, balanced_shape, divisors

TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class ShapeCandidate:
    """One evaluated factor shape.

    Attributes:
        shape: ``(m, n, p, q)`` with ``m·p = out`` and ``n·q = in``.
        terms: ``min(budget // cost, shape.max_rank, max_terms)`` with ``cost = m·n + p·q + sigma_cost``.
        params: ``terms · cost``, the trainable parameters the candidate spends (``≤ budget``).
        energy_kept: ``Σ_{k≤terms} σ_k² / ‖M‖_F²`` for the KPSVD spectrum ``σ`` of ``M`` in this shape.
    """

    shape: KronShape
    terms: int
    params: int
    energy_kept: float

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": self.shape.as_list()}


@dataclass
class ShapeChoice:
    """The chosen shape and the evidence: every evaluated candidate, best first."""

    best: ShapeCandidate
    candidates: list[ShapeCandidate]

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict(), "candidates": [c.to_dict() for c in self.candidates]}


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def term_cost(shape: KronShape, sigma_cost: int = 1) -> int:
    """Parameters of one term: ``m·n + p·q + sigma_cost``."""
    return shape.params_per_term + sigma_cost


def squareness_key(shape: KronShape) -> tuple[int, ...]:
    """The key :func:`balanced_shape` minimises (most square first).

    ``(m·n + p·q, |m − n| + |p − q|, |m·n − p·q|, m·n, m, n)``.
    """
    m, n, p, q = shape.m, shape.n, shape.p, shape.q
    return (m * n + p * q, abs(m - n) + abs(p - q), abs(m * n - p * q), m * n, m, n)


def spectrum_twin(shape: KronShape) -> KronShape:
    """The shape whose ``R(M)`` is exactly ``R(M)ᵀ`` for every ``M``, or ``shape`` itself when none is.

    ``(p, q, m, n)`` when ``(m = 1 or p = 1)`` and ``(n = 1 or q = 1)`` (the perfect shuffles between the two
    index orders are then identities); otherwise the transposed-role shape has a different spectrum.
    """
    m, n, p, q = shape.m, shape.n, shape.p, shape.q
    if (m == 1 or p == 1) and (n == 1 or q == 1):
        return KronShape(p, q, m, n)
    return shape


def candidate_shapes(
    out_features: int,
    in_features: int,
    budget: int,
    *,
    sigma_cost: int = 1,
    max_terms: int = 64,
    min_terms: int = 1,
) -> list[KronShape]:
    """Every ``(m, n, p, q)`` with ``m·p = out``, ``n·q = in`` and ``min_terms`` terms within budget.

    They fit when ``min_terms·(m·n + p·q + sigma_cost) ≤ budget``.
    Ordered by ``m`` then ``n`` ascending (divisor order), so deterministic. ``max_terms`` does not filter
    shapes (every fitting shape gets at least one term); it is validated here so both entry points agree.
    Returns an empty list when even the cheapest term exceeds the budget.
    """
    _check_int("out_features", out_features, 1)
    _check_int("in_features", in_features, 1)
    _check_int("budget", budget, 1)
    _check_int("sigma_cost", sigma_cost, 0)
    _check_int("max_terms", max_terms, 1)
    _check_int("min_terms", min_terms, 1)
    shapes = []
    for m in divisors(out_features):
        for n in divisors(in_features):
            shape = KronShape(m, n, out_features // m, in_features // n)
            if min_terms * term_cost(shape, sigma_cost) <= budget:
                shapes.append(shape)
    return shapes


def search_shape(
    matrix: torch.Tensor,
    budget: int,
    *,
    sigma_cost: int = 1,
    max_terms: int = 64,
    svd: str = "lowrank",
    niter: int = 4,
    oversample: int = 10,
    seed: int = 0,
    min_terms: int = 1,
    module_name: str = "<module>",
) -> ShapeChoice:
    """The factor shape of ``matrix: (out, in)`` that keeps the largest share of ``‖M‖_F²`` within ``budget``.

    Each candidate of :func:`candidate_shapes` is scored by ``energy_kept`` of its top ``terms`` KPSVD values
    (``svd="lowrank"``: seeded randomized SVD, exact ``"full"`` SVD whenever ``min(m·n, p·q) ≤
    2·(terms + oversample)``; ``svd="full"``: always exact). Randomized scores are low by up to a few percent
    of themselves on flat (noise-like) spectra, where all shapes score alike and the pick is arbitrary anyway;
    on decaying spectra they are close to exact. Only shapes that afford ``min_terms`` terms compete (a
    module that must keep ``min_rank`` terms). Raises ``ValueError`` for bad arguments and when no shape
    affords them (naming the module, its shape, the budget and the cheapest cost).
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        got = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"search_shape needs a 2-D matrix (out, in) for module {module_name!r}, got {got}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd method {svd!r} is unknown; allowed: {', '.join(SVD_METHODS)}")
    _check_int("niter", niter, 0)
    _check_int("oversample", oversample, 0)
    out_features, in_features = (int(s) for s in matrix.shape)
    shapes = candidate_shapes(
        out_features, in_features, budget, sigma_cost=sigma_cost, max_terms=max_terms, min_terms=min_terms
    )
    if not shapes:
        cheapest = balanced_shape(out_features, in_features)
        raise ValueError(
            f"parameter budget {budget} for module {module_name!r} with weight (out={out_features}, "
            f"in={in_features}) is smaller than {min_terms} of its cheapest Kronecker terms: "
            f"{term_cost(cheapest, sigma_cost)} parameters each (shape {cheapest.as_list()}: m*n + p*q + "
            "sigma_cost); raise the budget"
        )

    m32 = matrix.detach().to(torch.float32)
    total_energy = float(m32.double().pow(2).sum())
    if not math.isfinite(total_energy):
        raise ValueError(f"matrix of module {module_name!r} has non-finite entries; cannot search a shape")

    spectra: dict[KronShape, torch.Tensor] = {}  # shared by spectrum twins; kept per (shape, terms)
    candidates = []
    for shape in shapes:
        cost = term_cost(shape, sigma_cost)
        terms = min(budget // cost, shape.max_rank, max_terms)
        if terms == shape.max_rank or total_energy == 0.0:
            score = 1.0  # the full Kronecker rank reproduces M exactly (and a zero M is kept by anything)
        else:
            twin = spectrum_twin(shape)
            key = min(shape, twin, key=KronShape.as_list)
            spectrum = spectra.get(key)
            if spectrum is None or spectrum.numel() < terms:
                small = shape.max_rank <= 2 * (terms + oversample)
                method = "full" if svd == "full" or small else "lowrank"
                result = kpsvd(m32, key, terms, method=method, niter=niter, oversample=oversample, seed=seed)
                spectrum = spectra[key] = result.S.cpu()
            score = min(1.0, energy_kept(spectrum, total_energy, terms))
        candidates.append(ShapeCandidate(shape=shape, terms=terms, params=terms * cost, energy_kept=score))

    top = max(c.energy_kept for c in candidates)
    tied = [c for c in candidates if c.energy_kept >= top - TIE_TOLERANCE * abs(top)]
    best = min(tied, key=lambda c: (c.params, squareness_key(c.shape)))
    rest = sorted(
        (c for c in candidates if c is not best),
        key=lambda c: (-c.energy_kept, c.params, squareness_key(c.shape)),
    )
    return ShapeChoice(best=best, candidates=[best, *rest])
