"""The autograd function behind :func:`axolotl_soka.kron.kron_apply`: token chunks, recomputed intermediate.

For one token ``X: (n, q)`` and factors ``L: (r, m, n)``, ``R: (r, p, q)`` the function computes
``Y = Σ_k L_k X R_kᵀ: (m, p)`` in two products::

    Z = X · R_catᵀ              (n, r·p)      R_cat = R as (r·p, q); Z[j, (k, a)] = Σ_b X[j, b] R_k[a, b]
    Y = L_cat · Z'              (m, p)        L_cat[i, (j, k)] = L_k[i, j]; Z' = Z viewed as (n·r, p)

The first product is one GEMM over all tokens of a chunk (rows ``(token, j)``); the second is a batched
product whose per-token operand ``Z'`` is a plain view of the first one's output, so no permuted copy of the
``r·n·p``-per-token intermediate is made. Backward, per chunk, from ``dY``::

    Zᵀ   = R_cat · Xᵀ           recomputed, [(k, a), (token, j)], viewed as (r, p·tokens, n): [k, (a, t), j]
    dL  += dY' · Zᵀ              (r, m, n)   dY' = dY as [i, (a, t)]: one batched GEMM, inner dim p·tokens
    dZ'  = L_catᵀ · dY          (n·r, p) per token, a view of dZ: (n, r·p); written over Zᵀ's buffer
    dR_catᵀ += Xᵀ · dZ          (q, r·p)    one GEMM over the chunk's (token, j) rows
    dX   = dZ · R_cat           (n, q)

These properties matter for training cost:
- the intermediate ``Z`` is not kept for backward (it is recomputed there, one extra GEMM), so the only
  activation saved is the input, as for LoRA, instead of ``r·n·p`` values per token. LoRA-like shapes
  (``p = 1`` in this orientation) are the exception: their ``r·n``-per-token intermediate is LoRA's own
  rank-r activation, small next to the input, and is kept (see ``keeps_intermediate``). Their per-token
  products are matrix-vector, so the second product, ``dZ`` and ``dL`` run as plain GEMMs over the chunk;
- tokens are processed in chunks whose intermediate fits a byte budget. On a CPU a cache-sized chunk keeps
  the narrow (inner dimension 64 for LLaMA-7B's balanced shapes) GEMMs and the intermediates in cache, where
  they ran 2–3× faster than on the whole batch at once (``benchmarks/profile_kron_apply.py``); on a GPU the
  default budget makes a micro-batch one chunk;
- the chunk-sized scratch tensors are allocated once per call and reused by every chunk (see ``_Buffers``);
- with ``add_to`` (the frozen layer's output) the second product accumulates into it (``baddbmm_``, GEMM
  with β = 1), so the layer's sum ``base + ΔW x`` makes no output-sized temporary; its gradient is ``dY``.

The operand layouts (which factor is passed transposed, ``dR_catᵀ`` rather than ``dR_cat``) are the ones MKL
ran fastest, measured per product on LLaMA-7B's shapes.

``transpose=True`` runs the same computation on ``Xᵀ`` (and returns ``Yᵀ``), which is how the caller gets
the other contraction order (``A`` first): ``(A_k X B_kᵀ)ᵀ = B_k Xᵀ A_kᵀ``. Its second product is computed
as ``Yᵀ = Z'ᵀ · L_catᵀ`` per token, straight into the output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

#: intermediate bytes per chunk on a CPU: the chunk's ``Z`` (and its gradient) stay in a 32 MiB L3 cache
CPU_CHUNK_BYTES = 4 * 2**20
#: intermediate bytes per chunk elsewhere (GPUs): a micro-batch of a 7B model is normally one chunk
DEVICE_CHUNK_BYTES = 256 * 2**20


def chunk_tokens_for(intermediate_per_token: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk so that one chunk's intermediate (``intermediate_per_token`` values) fits the budget."""
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES
    per_token = max(1, intermediate_per_token) * dtype.itemsize
    return max(1, budget // per_token)


class _Buffers:
    """Scratch tensors reused by every chunk of one call (``take(name, *shape)``: a contiguous view of the
    first ``prod(shape)`` elements). Fresh chunk-sized tensors would each come from new pages: on a CPU their
    first-touch page faults cost as much as the narrow GEMMs writing them, and reuse keeps them in cache."""

    def __init__(self, like: torch.Tensor) -> None:
        self.like = like
        self.flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.flat.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.flat[name] = self.like.new_empty(numel)
        return buf[:numel].view(shape)


def _cat_factors(L: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_cat, R_cat)``: ``L: (r, m, n)`` as ``(m, n·r)`` with ``L_cat[i, (j, k)] = L_k[i, j]`` and
    ``R: (r, p, q)`` as ``(r·p, q)``."""
    r, m, n = L.shape
    return L.permute(1, 2, 0).reshape(m, n * r), R.reshape(r * R.shape[1], R.shape[2])


def keeps_intermediate(r: int, p_c: int, q_c: int) -> bool:
    """Whether the forward's intermediate is kept for backward rather than recomputed: only for LoRA-like
    shapes (``p_c = 1``, the per-token products are matrix-vector) whose ``r·n`` intermediate is at most a
    quarter of the ``n·q`` input, so that keeping it costs little memory next to the input autograd keeps."""
    return p_c == 1 and 4 * r <= q_c


def _add_product(out: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor) -> None:
    """``out += lhs · rhs`` (2-d or batched): a GEMM with β = 1 when the dtypes agree, else through a
    temporary (an fp32 accumulator of bf16/fp16 products)."""
    if out.dtype != lhs.dtype:
        out += torch.matmul(lhs, rhs)
    elif out.dim() == 2:
        out.addmm_(lhs, rhs)
    else:
        out.baddbmm_(lhs, rhs)


def _output_shape(N: int, m_c: int, p_c: int, transpose: bool) -> tuple[int, int, int]:
    """The output as the core orientation writes it: ``(N, m_c, p_c)``, or ``(N, p_c, m_c)`` transposed."""
    return (N, p_c, m_c) if transpose else (N, m_c, p_c)


def _core_input(x: torch.Tensor, transpose: bool, bufs: _Buffers) -> torch.Tensor:
    """A chunk ``(c, n, q)`` of the input as the first GEMM's rows: ``(c·n, q)``, or ``(c·q, n)`` transposed."""
    c, n, q = x.shape
    if transpose:
        xm = bufs.take("xm", c, q, n)
        xm.copy_(x.transpose(1, 2))
        return xm.view(c * q, n)
    return x.reshape(c * n, q)


def kron_forward(
    x: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    transpose: bool,
    chunk: int,
    add_to: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:class:`KronApply`'s forward without autograd: ``(y, z_kept)`` for ``x: (N, n, q)``. ``y`` is
    ``(N, m, p)`` (``(N, p, m)`` in the transposed core orientation), or ``add_to`` with the product added in
    place; ``z_kept`` is the ``(N·n, r)`` intermediate kept for backward (LoRA-like shapes, see
    :func:`keeps_intermediate`) or ``None``."""
    r, m_c, n_c = L.shape  # core orientation: m_c×n_c left factors, p_c×q_c right factors
    _, p_c, q_c = R.shape
    N = x.shape[0]
    l_cat, r_cat = _cat_factors(L, R)
    y_shape = _output_shape(N, m_c, p_c, transpose)
    # with add_to: accumulate in place into the caller's (N·m_c·p_c)-element output
    y = x.new_empty(y_shape) if add_to is None else add_to.view(y_shape)
    # LoRA-like shapes: the intermediate (r·n per token) is small next to the input (n·q per token), so it
    # is kept for backward like LoRA keeps its rank-r activation, instead of recomputed
    z_kept = x.new_empty(N * n_c, r) if keeps_intermediate(r, p_c, q_c) else None
    bufs = _Buffers(x)
    for start in range(0, N, chunk):
        xm = _core_input(x[start : start + chunk], transpose, bufs)
        c = xm.shape[0] // n_c
        if z_kept is None:
            z = bufs.take("z", c * n_c, r * p_c)
        else:
            z = z_kept[start * n_c : (start + c) * n_c]
        torch.mm(xm, r_cat.T, out=z)
        yc = y[start : start + c]
        if p_c == 1:  # LoRA-like shapes: the per-token products are matrix-vector, so one GEMM per chunk
            lhs, rhs, yc = z.view(c, n_c * r), l_cat.T, yc.view(c, m_c)
        elif transpose:  # Yᵀ per token, straight into the (c, p_c, m_c) output: Z'ᵀ · L_catᵀ
            z = z.view(c, n_c * r, p_c)
            lhs, rhs = z.transpose(1, 2), l_cat.T.expand(c, n_c * r, m_c)
        else:
            z = z.view(c, n_c * r, p_c)
            lhs, rhs = l_cat.expand(c, m_c, n_c * r), z
        if add_to is None:
            torch.matmul(lhs, rhs, out=yc)
        else:
            _add_product(yc, lhs, rhs)
    return y, z_kept


class KronApply(torch.autograd.Function):
    """``y[t] = Σ_k L_k x[t] R_kᵀ`` for ``x: (N, n, q)``, ``L: (r, m, n)``, ``R: (r, p, q)`` → ``(N, m, p)``.

    With ``transpose=True`` the factors come swapped, ``L: (r, p, q)`` and ``R: (r, m, n)``, and
    ``y[t] = (Σ_k L_k x[t]ᵀ R_kᵀ)ᵀ = Σ_k R_k x[t] L_kᵀ: (N, m, p)`` (the A-first order for ``A = R, B = L``).
    ``chunk`` is the number of tokens per chunk. ``add_to`` (or ``None``) is a contiguous tensor of
    ``N·m·p`` elements that ``y`` is added into in place and that is returned (marked dirty for autograd).
    Call it through :func:`axolotl_soka.kron.kron_apply`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        L: torch.Tensor,
        R: torch.Tensor,
        transpose: bool,
        chunk: int,
        add_to: torch.Tensor | None,
    ):
        if add_to is not None:
            ctx.mark_dirty(add_to)
        y, z_kept = kron_forward(x, L, R, transpose, chunk, add_to)
        ctx.save_for_backward(x, L, R, z_kept)
        ctx.transpose, ctx.chunk = transpose, chunk
        return y if add_to is None else add_to

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor):
        x, L, R, z_kept = ctx.saved_tensors
        need_x, need_l, need_r = ctx.needs_input_grad[:3]
        d_add_to = dy if ctx.needs_input_grad[5] else None  # y = add_to + …: its gradient passes through
        dx, dL, dR = kron_backward(x, L, R, dy, ctx.transpose, ctx.chunk, need_x, need_l, need_r, z_kept)
        return dx, dL, dR, None, None, d_add_to


def kron_backward(
    x: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    dy: torch.Tensor,
    transpose: bool,
    chunk: int,
    need_x: bool,
    need_l: bool,
    need_r: bool,
    z_kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dL, dR)`` of :class:`KronApply`'s ``y`` for ``x: (N, n, q)`` and the incoming gradient ``dy``
    (``N·m·p`` values), each ``None`` where not needed. ``z_kept`` is the forward's kept intermediate
    (``(N·n, r)``, LoRA-like shapes only); without it the intermediate is recomputed per chunk."""
    r, m_c, n_c = L.shape
    _, p_c, q_c = R.shape
    N = x.shape[0]
    dy = dy.to(x.dtype).reshape(_output_shape(N, m_c, p_c, transpose))
    l_cat, r_cat = _cat_factors(L, R)
    # contiguous transposes of the (small) factors: MKL ran these products 10–25 % faster with them
    l_cat_t, r_cat_t = l_cat.T.contiguous(), r_cat.T.contiguous()
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    vector = p_c == 1  # LoRA-like shapes: dL and dZ as plain GEMMs over the chunk's tokens
    # accumulators, in the orientation whose GEMM ran fastest (benchmarks/bench_products.py): wide outputs
    # for the vector case (MKL ran the tall-and-thin transposed form 6.7× slower at 4096 × 8), dR_catᵀ for
    # the others
    if need_l:  # vector: dL_catᵀ[(j, k), i] = dL_k[i, j]
        d_l = torch.zeros(*((n_c * r, m_c) if vector else (r, m_c, n_c)), dtype=acc, device=x.device)
    if need_r:  # vector: dR_cat (r, q); else dR_catᵀ (q, r·p)
        d_r = torch.zeros(*((r, q_c) if vector else (q_c, r * p_c)), dtype=acc, device=x.device)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    bufs = _Buffers(x)
    for start in range(0, N, chunk):
        xm = _core_input(x[start : start + chunk], transpose, bufs)
        c = xm.shape[0] // n_c
        dyc = dy[start : start + c]  # (c, m_c, p_c), or (c, p_c, m_c) transposed
        if vector:
            dyc = dyc.reshape(c, m_c)
        elif transpose or not dyc.is_contiguous():
            dyc = bufs.take("dy", c, m_c, p_c).copy_(dyc.transpose(1, 2) if transpose else dyc)
        if need_l and vector:
            if z_kept is None:  # Z recomputed as in forward: [t, (j, k)]
                z = bufs.take("z", c, n_c * r)
                torch.mm(xm, r_cat.T, out=z.view(c * n_c, r))
            else:
                z = z_kept[start * n_c : (start + c) * n_c].view(c, n_c * r)
            _add_product(d_l, z.T, dyc)  # (n_c·r, m_c): Σ_t Z[t, (j, k)] dY[t, i]
        elif need_l:
            zt = bufs.take("z", r * p_c, c * n_c)  # Zᵀ recomputed: [(k, a), (t, j)]
            torch.mm(r_cat_t.T, xm.T, out=zt)
            dyp = bufs.take("dyp", m_c, p_c, c).copy_(dyc.permute(1, 2, 0))  # [i, a, t]
            # (r, m_c, n_c): Σ_{a,t} dY[t,i,a] Z[t,j,k,a], with Zᵀ viewed as [k, (a, t), j]
            _add_product(d_l, dyp.view(m_c, p_c * c).expand(r, m_c, p_c * c), zt.view(r, p_c * c, n_c))
        if need_r or need_x:
            if vector:
                dz = torch.mm(dyc, l_cat, out=bufs.take("z", c, n_c * r))
            else:
                dz = torch.bmm(l_cat_t.expand(c, n_c * r, m_c), dyc, out=bufs.take("z", c, n_c * r, p_c))
            dz = dz.view(c * n_c, r * p_c)  # [(t, j), (k, a)]
            if need_r:
                _add_product(d_r, *((dz.T, xm) if vector else (xm.T, dz)))
            if need_x:
                if transpose:
                    dxm = bufs.take("dx", c * n_c, q_c)
                    torch.mm(dz, r_cat, out=dxm)
                    dx[start : start + c] = dxm.view(c, n_c, q_c).transpose(1, 2)
                else:
                    torch.mm(dz, r_cat, out=dx[start : start + c].view(c * n_c, q_c))
    dL = dR = None
    if need_l:
        dL = (d_l.view(n_c, r, m_c).permute(1, 2, 0) if vector else d_l).to(L.dtype)
    if need_r:
        dR = (d_r if vector else d_r.T).reshape(r, p_c, q_c).to(R.dtype)
    return dx, dL, dR
