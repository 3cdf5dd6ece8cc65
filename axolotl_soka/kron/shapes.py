"""Kronecker factor shapes for an ``(out, in)`` weight.

A shape ``(m, n, p, q)`` means ``ΔW = Σ_k A_k ⊗ B_k`` with ``A_k: (m, n)`` and ``B_k: (p, q)``, so it must satisfy
``out = m·p`` and ``in = n·q``. One term costs ``m·n + p·q`` parameters and the Kronecker rank is at most
``min(m·n, p·q)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SHAPE_RULES = ("balanced", "lora")


class ShapeError(ValueError):
    """A factor shape that cannot be used for module ``module`` (kept so callers can name its config key)."""

    def __init__(self, message: str, module: str = "<module>") -> None:
        super().__init__(message)
        self.module = module


@dataclass(frozen=True)
class KronShape:
    """Factor shape ``(m, n, p, q)``: ``A_k`` is ``(m, n)``, ``B_k`` is ``(p, q)``, ``W`` is ``(m·p, n·q)``."""

    m: int
    n: int
    p: int
    q: int

    @property
    def out_features(self) -> int:
        return self.m * self.p

    @property
    def in_features(self) -> int:
        return self.n * self.q

    @property
    def params_per_term(self) -> int:
        """Trainable entries of one term ``A_k ⊗ B_k`` (without a separate σ)."""
        return self.m * self.n + self.p * self.q

    @property
    def max_rank(self) -> int:
        """Largest Kronecker rank: the smaller side of the rearranged matrix ``R(W)``, ``min(m·n, p·q)``."""
        return min(self.m * self.n, self.p * self.q)

    def as_list(self) -> list[int]:
        return [self.m, self.n, self.p, self.q]


def divisors(x: int) -> list[int]:
    """All positive divisors of ``x`` in increasing order."""
    if x < 1:
        raise ValueError(f"cannot factor a dimension of size {x}")
    small = [d for d in range(1, int(x**0.5) + 1) if x % d == 0]
    return sorted(set(small + [x // d for d in small]))


def balanced_shape(out_features: int, in_features: int) -> KronShape:
    """The factorization minimising ``m·n + p·q`` (parameters per term); ties go to the most square factors.

    Tie-break order: ``|m − n| + |p − q|`` (square factors), then ``|m·n − p·q|``, then the smaller ``A``
    first (as PEFT's LoKr does). For 4096×4096 this is ``(64, 64, 64, 64)``; for 11008×4096,
    ``(86, 64, 128, 64)``. A prime dimension degenerates to a LoRA-like factor on that side.
    """
    best: tuple[tuple[int, ...], KronShape] | None = None
    for m in divisors(out_features):
        p = out_features // m
        for n in divisors(in_features):
            q = in_features // n
            key = (m * n + p * q, abs(m - n) + abs(p - q), abs(m * n - p * q), m * n, m, n)
            if best is None or key < best[0]:
                best = (key, KronShape(m, n, p, q))
    assert best is not None
    return best[1]


def lora_shape(out_features: int, in_features: int) -> KronShape:
    """The degenerate shape ``(out, 1, 1, in)``: every term is a rank-1 matrix ``u vᵀ`` and KPSVD is the SVD."""
    return KronShape(out_features, 1, 1, in_features)


def resolve_shape(
    spec: str | Sequence[int], out_features: int, in_features: int, module_name: str = "<module>"
) -> KronShape:
    """Turn a shape spec (``"balanced"``, ``"lora"`` or ``[m, n, p, q]``) into a checked :class:`KronShape`.

    Raises :class:`ShapeError` (a ``ValueError``) naming the module, its dimensions and the shape when it
    does not multiply out.
    """
    if isinstance(spec, str):
        if spec == "balanced":
            return balanced_shape(out_features, in_features)
        if spec == "lora":
            return lora_shape(out_features, in_features)
        raise ShapeError(
            f"factor shape {spec!r} for module {module_name!r} is unknown; allowed: "
            f"{', '.join(SHAPE_RULES)} or a list [m, n, p, q] with m*p = out and n*q = in",
            module_name,
        )
    values = list(spec)
    if len(values) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        problem = f"factor shape {values!r} for module {module_name!r} must be four positive integers"
        raise ShapeError(f"{problem} [m, n, p, q]", module_name)
    shape = KronShape(*values)
    if shape.out_features != out_features or shape.in_features != in_features:
        raise ShapeError(
            f"factor shape {values} does not fit module {module_name!r} with weight (out={out_features}, "
            f"in={in_features}): m*p = {shape.out_features} must equal out and n*q = {shape.in_features} "
            "must equal in",
            module_name,
        )
    return shape
