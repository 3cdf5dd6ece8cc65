"""Kronecker-product SVD (KPSVD): the top singular triplets of the rearranged weight ``R(W)``.

``W ≈ Σ_{k<K} σ_k U_k ⊗ V_k`` with ``U_k = reshape(u_k, (m, n))`` and ``V_k = reshape(v_k, (p, q))``, where
``(σ_k, u_k, v_k)`` are the singular triplets of ``R(W)``. Computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .rearrange import rearrange
from .shapes import KronShape

SVD_METHODS = ("full", "lowrank")


@dataclass
class KPSVDResult:
    """Top-``K`` Kronecker components of a weight.

    Attributes:
        A: ``(K, m, n)`` unit-Frobenius-norm left factors ``U_k``.
        B: ``(K, p, q)`` unit-Frobenius-norm right factors ``V_k``.
        S: ``(K,)`` singular values ``σ_k``, descending.
        total_energy: ``‖W‖_F²`` (= ``Σ_all σ_k²``), so energy shares need only the top ``K``.
    """

    A: torch.Tensor
    B: torch.Tensor
    S: torch.Tensor
    total_energy: float

    @property
    def rank(self) -> int:
        return int(self.S.numel())


@contextlib.contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """Run CPU work on one thread, then restore the thread count.

    The randomized SVD works on skinny ``(rows, K + oversample)`` matrices. On a CPU shared with other work,
    multi-threaded LAPACK QR/SVD on such shapes runs far slower than on one thread (threads wait on a busy
    core; measured in docs/benchmarks.md, "KPSVD initialisation time per matrix"), while two threads on an
    idle machine gain at most 2×.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def randomized_svd(
    matrix: torch.Tensor, rank: int, *, niter: int = 8, oversample: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``matrix: (M, N)`` by randomized range finding (Halko et al., 2011, Alg. 4.4).

    Returns ``U: (M, rank)``, ``S: (rank,)``, ``Vh: (rank, N)``. We do not use ``torch.svd_lowrank`` because it
    draws from the global RNG; an explicit ``torch.Generator`` makes the result identical run to run and on
    every process (ranks chosen from ``S`` must agree across data-parallel workers).
    """
    rows, cols = matrix.shape
    width = min(rank + oversample, rows, cols)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    omega = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)

    def orthonormal(sketch: torch.Tensor) -> torch.Tensor:
        with single_threaded(sketch.device):  # skinny QR; the products around it keep all threads
            return torch.linalg.qr(sketch).Q

    basis = orthonormal(matrix @ omega)
    for _ in range(niter):  # power iterations sharpen a slowly decaying spectrum
        basis = orthonormal(matrix.T @ basis)
        basis = orthonormal(matrix @ basis)
    small = basis.T @ matrix
    with single_threaded(small.device):
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair ``(u_k, v_k)`` so that the largest-magnitude entry of ``u_k`` is positive.

    ``u: (M, K)``, ``vh: (K, N)``. Singular vectors are unique only up to a joint sign; fixing it makes the
    factors reproducible across SVD backends and processes.
    """
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs.unsqueeze(1)


def kpsvd(
    weight: torch.Tensor,
    shape: KronShape,
    rank: int,
    *,
    method: str = "lowrank",
    niter: int = 8,
    oversample: int = 10,
    seed: int = 0,
) -> KPSVDResult:
    """Top-``rank`` Kronecker components of ``weight: (m·p, n·q)`` in fp32.

    ``method="full"`` uses ``torch.linalg.svd``; ``"lowrank"`` uses :func:`randomized_svd` (seeded) and falls back
    to the full SVD when ``rank + oversample`` reaches half of ``min(m·n, p·q)``, where it is no cheaper.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd method {method!r} is unknown; allowed: {', '.join(SVD_METHODS)}")
    rank = max(0, min(int(rank), shape.max_rank))
    w32 = weight.detach().to(torch.float32)
    total_energy = float(w32.pow(2).sum())
    matrix = rearrange(w32, shape)
    if method == "full" or 2 * (rank + oversample) >= shape.max_rank:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = randomized_svd(matrix, rank, niter=niter, oversample=oversample, seed=seed)
    u, vh = fix_signs(u, vh)
    a = u.T.reshape(rank, shape.m, shape.n).contiguous()
    b = vh.reshape(rank, shape.p, shape.q).contiguous()
    return KPSVDResult(A=a, B=b, S=s.contiguous(), total_energy=total_energy)


def kron_coefficients(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``c_k = ⟨W, A_k ⊗ B_k⟩_F = vec(A_k)ᵀ R(W) vec(B_k)`` for ``A: (r, m, n)``, ``B: (r, p, q)``: ``(r,)`` in fp32.

    With orthonormal ``{A_k}`` and ``{B_k}`` (any KPSVD's factors), ``Σ c_k A_k ⊗ B_k`` is the orthogonal
    projection of ``W`` onto their span, so ``W − Σ c_k A_k ⊗ B_k`` is an exact residual.
    """
    r, m, n = A.shape
    _, p, q = B.shape
    matrix = rearrange(weight.to(torch.float32), KronShape(m, n, p, q))  # (m·n, p·q)
    a, b = A.reshape(r, m * n).to(matrix), B.reshape(r, p * q).to(matrix)
    return ((a @ matrix) * b).sum(dim=1)
