"""The Van Loan–Pitsianis rearrangement ``R`` that turns a Kronecker sum into a low-rank matrix.

For ``W: (m·p, n·q)``, ``R(W): (m·n, p·q)`` with ``R(W)[(i, j), (a, b)] = W[i·p + a, j·q + b]``: row ``(i, j)``
is the row-major vec of the ``(i, j)``-th ``(p, q)`` block of ``W``. Hence ``R(A ⊗ B) = vec(A) vec(B)ᵀ`` and
``‖W − Σ A_k ⊗ B_k‖_F = ‖R(W) − Σ vec(A_k) vec(B_k)ᵀ‖_F``: the truncated SVD of ``R(W)`` is the best
Kronecker-rank-``r`` approximation (Eckart–Young). ``R`` only permutes entries, so ``‖R(W)‖_F = ‖W‖_F``.
"""

from __future__ import annotations

import torch

from .shapes import KronShape


def rearrange(weight: torch.Tensor, shape: KronShape) -> torch.Tensor:
    """``R(W)``: ``(m·p, n·q) → (m·n, p·q)``; one copy, no Python loops."""
    m, n, p, q = shape.m, shape.n, shape.p, shape.q
    if tuple(weight.shape) != (m * p, n * q):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not match factor shape {shape.as_list()}"
        )
    return weight.reshape(m, p, n, q).permute(0, 2, 1, 3).reshape(m * n, p * q)


def rearrange_inverse(matrix: torch.Tensor, shape: KronShape) -> torch.Tensor:
    """``R⁻¹``: ``(m·n, p·q) → (m·p, n·q)``."""
    m, n, p, q = shape.m, shape.n, shape.p, shape.q
    if tuple(matrix.shape) != (m * n, p * q):
        raise ValueError(
            f"matrix of shape {tuple(matrix.shape)} does not match factor shape {shape.as_list()}"
        )
    return matrix.reshape(m, n, p, q).permute(0, 2, 1, 3).reshape(m * p, n * q)
