"""Apply a Kronecker sum to activations without forming it, and materialise it for merging.

``ΔW = Σ_k A_k ⊗ B_k`` with ``A: (r, m, n)``, ``B: (r, p, q)``; ``ΔW: (m·p, n·q)``. For one token ``x`` of
length ``n·q`` reshaped row-major to ``X: (n, q)``, ``(A_k ⊗ B_k) x`` reshaped to ``(m, p)`` is ``A_k X B_kᵀ``.
"""

from __future__ import annotations

import torch

from .apply_autograd import KronApply, chunk_tokens_for


def contraction_costs(m: int, n: int, p: int, q: int) -> tuple[int, int]:
    """Multiply-adds per token and term of the two contraction orders: ``(B first, A first)``.

    B first: ``X B_kᵀ`` then ``A_k ·`` costs ``n·p·(q + m)``, intermediate ``n·p`` per term.
    A first: ``A_k X`` then ``· B_kᵀ`` costs ``m·q·(n + p)``, intermediate ``m·q`` per term.
    """
    return n * p * (q + m), m * q * (n + p)


def kron_apply(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """``y = x · (Σ_k A_k ⊗ B_k)ᵀ`` for ``x: (..., n·q)`` → ``y: (..., m·p)``.

    All terms at once (the sum over ``k`` is folded into the second product's inner dimension), in the
    cheaper of the two contraction orders; ``ΔW`` is never formed and the ``r·n·p``-per-token intermediate is
    not kept for backward (:class:`~axolotl_soka.kron.apply_autograd.KronApply` recomputes it). Tokens run in
    chunks of ``chunk_tokens`` (default: a cache-sized chunk on a CPU, a whole micro-batch on a GPU).
    Under ``torch.autocast`` the product runs in the autocast dtype, like ``torch.matmul`` would.
    """
    r, m, n = A.shape
    _, p, q = B.shape
    lead = x.shape[:-1]
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
    tokens = x.reshape(-1, n, q)  # (N, n, q)
    b_first, a_first = contraction_costs(m, n, p, q)
    transpose = a_first < b_first
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(r * (m * q if transpose else n * p), x.dtype, x.device)
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of tokens (or None), got {chunk_tokens}")
    left, right = (B, A) if transpose else (A, B)
    with torch.autocast(device_type, enabled=False):
        y = KronApply.apply(tokens, left, right, transpose, chunk_tokens)
    return y.reshape(*lead, m * p)


def kron_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Materialise ``Σ_k A_k ⊗ B_k``: ``A: (r, m, n)``, ``B: (r, p, q)`` → ``(m·p, n·q)`` (for merging)."""
    r, m, n = A.shape
    _, p, q = B.shape
    return torch.einsum("kij,kab->iajb", A, B).reshape(m * p, n * q)
