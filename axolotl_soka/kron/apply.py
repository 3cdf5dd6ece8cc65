"""Apply a Kronecker sum to activations without forming it, and materialise it for merging.

``ΔW = Σ_k A_k ⊗ B_k`` with ``A: (r, m, n)``, ``B: (r, p, q)``; ``ΔW: (m·p, n·q)``. For one token ``x`` of
length ``n·q`` reshaped row-major to ``X: (n, q)``, ``(A_k ⊗ B_k) x`` reshaped to ``(m, p)`` is ``A_k X B_kᵀ``.
"""

from __future__ import annotations

import torch

from .apply_autograd import KronApply, chunk_tokens_for
from .apply_op import kron_apply_op


def contraction_costs(m: int, n: int, p: int, q: int) -> tuple[int, int]:
    """Multiply-adds per token and term of the two contraction orders: ``(B first, A first)``.

    B first: ``X B_kᵀ`` then ``A_k ·`` costs ``n·p·(q + m)``, intermediate ``n·p`` per term.
    A first: ``A_k X`` then ``· B_kᵀ`` costs ``m·q·(n + p)``, intermediate ``m·q`` per term.
    """
    return n * p * (q + m), m * q * (n + p)


def contraction_plan(
    A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, device: torch.device, chunk_tokens: int | None
) -> tuple[bool, int]:
    """``(transpose, chunk)`` for ``A: (r, m, n)``, ``B: (r, p, q)``: whether the A-first order is the cheaper
    one (the autograd function then takes the factors swapped), and the tokens per chunk: ``chunk_tokens``,
    or by device for the order's intermediate (``r·m·q`` or ``r·n·p`` values per token) when ``None``."""
    r, m, n = A.shape
    _, p, q = B.shape
    b_first, a_first = contraction_costs(m, n, p, q)
    transpose = a_first < b_first
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(r * (m * q if transpose else n * p), dtype, device)
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of tokens (or None), got {chunk_tokens}")
    return transpose, chunk_tokens


def kron_apply(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    chunk_tokens: int | None = None,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x · (Σ_k A_k ⊗ B_k)ᵀ`` for ``x: (..., n·q)`` → ``y: (..., m·p)``.

    With ``add_to`` (a contiguous ``(..., m·p)`` tensor of the compute dtype, e.g. the frozen layer's output)
    the product is added into it in place and ``add_to`` is returned, as ``add_to.add_(y)`` would (autograd
    sees an in-place op): no ``y``-sized temporary is made and the sum costs no extra pass over memory.

    All terms at once (the sum over ``k`` is folded into the second product's inner dimension), in the
    cheaper of the two contraction orders; ``ΔW`` is never formed and the ``r·n·p``-per-token intermediate is
    not kept for backward (:class:`~axolotl_soka.kron.apply_autograd.KronApply` recomputes it; LoRA-like
    shapes keep their small ``r``-per-token one, as LoRA does). Tokens run in
    chunks of ``chunk_tokens`` (default: a cache-sized chunk on a CPU, a whole micro-batch on a GPU).
    Under ``torch.autocast`` the product runs in the autocast dtype, like ``torch.matmul`` would. Under
    ``torch.compile`` it runs as the custom operators of :mod:`~axolotl_soka.kron.apply_op`.
    """
    r, m, n = A.shape
    _, p, q = B.shape
    lead = x.shape[:-1]
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
    tokens = x.reshape(-1, n, q)  # (N, n, q)
    transpose, chunk_tokens = contraction_plan(A, B, x.dtype, x.device, chunk_tokens)
    if add_to is not None:
        _check_add_to(add_to, lead, m * p, x.dtype)
    left, right = (B, A) if transpose else (A, B)
    with torch.autocast(device_type, enabled=False):
        if torch.compiler.is_compiling():  # one opaque operator each way, not an unrolled chunk loop
            y = kron_apply_op(tokens, left, right, transpose, chunk_tokens)[0]
            if add_to is not None:
                return add_to.add_(y.view(add_to.shape))
        else:
            y = KronApply.apply(tokens, left, right, transpose, chunk_tokens, add_to)
    return y if add_to is not None else y.reshape(*lead, m * p)


def _check_add_to(add_to: torch.Tensor, lead: torch.Size, out_features: int, dtype: torch.dtype) -> None:
    """``add_to`` must be a contiguous ``(*lead, out_features)`` tensor of the product's dtype."""
    expected = (*lead, out_features)
    if tuple(add_to.shape) != expected or add_to.dtype != dtype or not add_to.is_contiguous():
        raise ValueError(
            f"add_to must be a contiguous {dtype} tensor of shape {list(expected)}, got "
            f"{'a contiguous' if add_to.is_contiguous() else 'a non-contiguous'} {add_to.dtype} tensor of shape "
            f"{list(add_to.shape)}"
        )


def kron_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Materialise ``Σ_k A_k ⊗ B_k``: ``A: (r, m, n)``, ``B: (r, p, q)`` → ``(m·p, n·q)`` (for merging)."""
    r, m, n = A.shape
    _, p, q = B.shape
    return torch.einsum("kij,kab->iajb", A, B).reshape(m * p, n * q)
