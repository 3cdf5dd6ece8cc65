"""Apply a Kronecker sum to activations without forming it, and materialise it for merging.

``ΔW = Σ_k A_k ⊗ B_k`` with ``A: (r, m, n)``, ``B: (r, p, q)``; ``ΔW: (m·p, n·q)``. For one token ``x`` of
length ``n·q`` reshaped row-major to ``X: (n, q)``, ``(A_k ⊗ B_k) x`` reshaped to ``(m, p)`` is ``A_k X B_kᵀ``.
"""

from __future__ import annotations

import torch


def contraction_costs(m: int, n: int, p: int, q: int) -> tuple[int, int]:
    """Multiply-adds per token and term of the two contraction orders: ``(B first, A first)``.

    B first: ``X B_kᵀ`` then ``A_k ·`` costs ``n·p·(q + m)``, intermediate ``n·p`` per term.
    A first: ``A_k X`` then ``· B_kᵀ`` costs ``m·q·(n + p)``, intermediate ``m·q`` per term.
    """
    return n * p * (q + m), m * q * (n + p)


def kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``y = x · (Σ_k A_k ⊗ B_k)ᵀ`` for ``x: (..., n·q)`` → ``y: (..., m·p)``.

    All terms at once as two matrix products (the sum over ``k`` is folded into the second product's inner
    dimension), in the cheaper of the two contraction orders; ``ΔW`` is never formed.
    """
    r, m, n = A.shape
    _, p, q = B.shape
    lead = x.shape[:-1]
    tokens = x.reshape(-1, n, q)  # (N, n, q)
    N = tokens.shape[0]
    b_first, a_first = contraction_costs(m, n, p, q)
    if b_first <= a_first:
        t = tokens.reshape(N * n, q) @ B.reshape(r * p, q).T  # (N·n, r·p): T[j, k, a] = Σ_b X[j,b] B_k[a,b]
        t = t.reshape(N, n, r, p).permute(0, 3, 2, 1).reshape(N * p, r * n)
        y = t @ A.permute(1, 0, 2).reshape(m, r * n).T  # (N·p, m): Σ_k Σ_j A_k[i,j] T[j,k,a]
        y = y.reshape(N, p, m).transpose(1, 2)
    else:
        t = (
            tokens.transpose(1, 2).reshape(N * q, n) @ A.reshape(r * m, n).T
        )  # (N·q, r·m): Σ_j A_k[i,j] X[j,b]
        t = t.reshape(N, q, r, m).permute(0, 3, 2, 1).reshape(N * m, r * q)
        y = t @ B.permute(1, 0, 2).reshape(p, r * q).T  # (N·m, p): Σ_k Σ_b B_k[a,b] T[k,i,b]
        y = y.reshape(N, m, p)
    return y.reshape(*lead, m * p)


def kron_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Materialise ``Σ_k A_k ⊗ B_k``: ``A: (r, m, n)``, ``B: (r, p, q)`` → ``(m·p, n·q)`` (for merging)."""
    r, m, n = A.shape
    _, p, q = B.shape
    return torch.einsum("kij,kab->iajb", A, B).reshape(m * p, n * q)
