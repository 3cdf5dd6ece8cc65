"""A linear layer with a Kronecker-sum update through one dense product: ``y = x·(W + Σ_k A_k ⊗ B_k)ᵀ + b``.

The factored apply (:func:`axolotl_soka.kron.kron_apply`) costs ``r·min(n·p·(q+m), m·q·(n+p))`` multiply-adds
per token and product, six such products per training step, next to the frozen layer's two ``out·in`` ones.
Forming the effective weight ``W + ΔW`` costs a few passes over an ``out × in`` tensor once per call, independent
of the number of tokens. So past some hundreds of tokens (512 for LLaMA-7B's balanced 4096² shape at r = 8,
see :func:`dense_forward_pays`) it is cheaper to run the forward and the input gradient through the frozen
layer's own GEMM on ``W + ΔW``:

    forward:   W_eff = W + Σ_k A_k ⊗ B_k           (out, in), built per block of A's rows, not kept
               y     = x · W_effᵀ + b               one GEMM, as the frozen layer alone
    backward:  W_eff rebuilt;  dx = dy · W_eff      one GEMM, as the frozen layer alone
               dA, dB                               factored, as kron_apply's backward without its dx

Only ``x`` and the factors are saved for backward (``W`` is the layer's parameter); ``W_eff`` is a transient
weight-sized tensor in forward and again in backward (on a CPU one reused tensor per weight shape and dtype,
see ``_Workspace``). The factor gradients take four of kron_apply's
products (the intermediate recomputed, ``dA``, ``dZ``, ``dB``), so a step costs four factored products plus
two weight-sized constructions instead of seven factored products.

In bf16/fp16 ``W_eff`` is summed in fp32 and rounded to the compute dtype once per element, so the forward
sees the update on the compute dtype's grid of ``W + ΔW`` rather than added to the layer's output.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .apply import contraction_costs, contraction_plan
from .apply_autograd import kron_backward

#: what forming one element of ``W + ΔW`` is charged, in multiply-adds of the factored products. Measured on a
#: 2-core CPU (``benchmarks/bench_dense_weight.py``): 0.7–1.0 ns per element into the reused buffer, where the
#: factored forward ran at 21–46 GMAC/s, i.e. 14–47 multiply-adds. The margin is deliberate: the first rule,
#: charging ``r + 2``, sent SmolLM2's one-term modules to the dense forward, and the whole step got slower
#: (``benchmarks/bench_step.py --dense``); the backward's rebuild and the calls' overheads are not in this count
FORM_COST_PER_ELEMENT = 128
#: bytes of one block of the weight construction on a CPU: a block's ``(rows, n, p·q)`` delta is built by one
#: batched product and added, permuted, into the output while it is still in cache
_WEIGHT_BLOCK_BYTES = 4 * 2**20
#: the same elsewhere (GPUs), where fewer, larger blocks mean fewer kernel launches
_DEVICE_WEIGHT_BLOCK_BYTES = 256 * 2**20


def dense_forward_pays(tokens: int, r: int, m: int, n: int, p: int, q: int) -> bool:
    """Whether the dense forward is the cheaper one for ``tokens`` tokens: each of the two factored products it
    saves per pass (forward, and the input gradient in backward: ``tokens·r·min(contraction_costs)``
    multiply-adds each) outweighs building ``W + ΔW`` once (``FORM_COST_PER_ELEMENT·out·in``)."""
    factored = tokens * r * min(contraction_costs(m, n, p, q))
    return factored >= FORM_COST_PER_ELEMENT * m * n * p * q


def effective_weight(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W + Σ_k A_k ⊗ B_k``: ``weight: (m·p, n·q)``, ``A: (r, m, n)``, ``B: (r, p, q)`` → a new ``(m·p, n·q)``
    tensor of ``dtype`` (default: the weight's). The sum is formed in fp32 when ``dtype`` is bf16/fp16.

    Per block of rows ``i`` of ``A``: ``D[i, j, (a, b)] = Σ_k A_k[i, j] B_k[a, b]`` (one batched product with
    inner dimension ``r``), added to ``W[(i, a), (j, b)]`` through a permuted view."""
    r, m, n = A.shape
    _, p, q = B.shape
    dtype = weight.dtype if dtype is None else dtype
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if out is None:
        out = torch.empty(m * p, n * q, dtype=dtype, device=weight.device)
    a_rows = A.to(acc).permute(1, 2, 0)  # (m, n, r)
    b_flat = B.to(acc).reshape(r, p * q)
    w4, out4 = weight.reshape(m, p, n, q), out.view(m, p, n, q)
    row_bytes = n * p * q * torch.finfo(acc).bits // 8
    budget = _WEIGHT_BLOCK_BYTES if weight.device.type == "cpu" else _DEVICE_WEIGHT_BLOCK_BYTES
    rows = max(1, min(m, budget // row_bytes))
    delta = torch.empty(rows, n, p * q, dtype=acc, device=weight.device)
    for i0 in range(0, m, rows):
        i1 = min(m, i0 + rows)
        d = torch.bmm(a_rows[i0:i1], b_flat.expand(i1 - i0, r, p * q), out=delta[: i1 - i0])
        torch.add(w4[i0:i1], d.view(i1 - i0, n, p, q).permute(0, 2, 1, 3), out=out4[i0:i1])
    return out


class _Workspace(threading.local):
    """One reusable ``W + ΔW`` tensor per shape and dtype, per thread, for CPU tensors.

    A fresh weight-sized CPU tensor comes from new pages each call, and touching them first cost two thirds of
    building ``W + ΔW``: 56 ms fresh against 17 ms reused for 4096² in fp32, 146 against 41 ms for 11008×4096
    (``benchmarks/bench_dense_weight.py``).
    The tensor is only read by the one GEMM that follows its construction, so layers of the same shape can share
    it. CUDA's caching allocator already reuses memory, so GPUs take fresh tensors."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[tuple[int, int], torch.dtype], torch.Tensor] = {}

    def take(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if device.type != "cpu":
            return None
        key = (shape, dtype)
        if key not in self.tensors:
            # a normal tensor even when first made under torch.inference_mode(): an inference tensor could not
            # be written into by a later call with autograd on
            with torch.inference_mode(False):
                self.tensors[key] = torch.empty(shape, dtype=dtype)
        return self.tensors[key]


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the calling thread's reused CPU ``W + ΔW`` tensors (the next dense call makes them again). Called
    when SoKA is unloaded or merged, after which no layer needs them."""
    _WORKSPACE.tensors.clear()


def _transient_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``W + ΔW`` for one GEMM: in the thread's CPU workspace, or a fresh tensor elsewhere."""
    out = _WORKSPACE.take(tuple(weight.shape), dtype, weight.device)
    return effective_weight(weight, A, B, dtype, out=out)


def dense_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """``x·(W + Σ_k A_k ⊗ B_k)ᵀ + b`` for ``x: (N, n·q)`` → ``(N, m·p)``, through the transient ``W + ΔW``."""
    w_eff = _transient_weight(weight, A, B, x.dtype)
    return torch.nn.functional.linear(x, w_eff, None if bias is None else bias.to(x.dtype))


def dense_linear_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    dy: torch.Tensor,
    transpose: bool,
    chunk: int,
    need_x: bool,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dA, dB)`` of :func:`dense_linear_forward`'s output for the incoming ``dy: (N, m·p)``, each
    ``None`` where not needed: ``dx = dy·(W + ΔW)`` (rebuilt), the factor gradients factored (``transpose``
    and ``chunk`` as for :class:`~axolotl_soka.kron.apply_autograd.KronApply`)."""
    dx = dA = dB = None
    if need_x:
        dx = dy.to(x.dtype).mm(_transient_weight(weight, A, B, x.dtype))
    if need_a or need_b:
        tokens = x.reshape(-1, A.shape[2], B.shape[2])  # (N, n, q)
        left, right = (B, A) if transpose else (A, B)
        need_l, need_r = (need_b, need_a) if transpose else (need_a, need_b)
        _, d_left, d_right = kron_backward(
            tokens, left.to(x.dtype), right.to(x.dtype), dy, transpose, chunk, False, need_l, need_r
        )
        dA, dB = (d_right, d_left) if transpose else (d_left, d_right)
        dA = None if dA is None else dA.to(A.dtype)
        dB = None if dB is None else dB.to(B.dtype)
    return dx, dA, dB


class DenseKronLinear(torch.autograd.Function):
    """``y = x·(W + Σ_k A_k ⊗ B_k)ᵀ + b`` for ``x: (N, n·q)`` → ``(N, m·p)``; ``W`` and ``b`` receive no
    gradient (a frozen layer). ``transpose`` and ``chunk`` set the factor gradients' contraction order and
    tokens per chunk, as for :class:`~axolotl_soka.kron.apply_autograd.KronApply`. Call it through
    :func:`kron_linear`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        transpose: bool,
        chunk: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, A, B)
        ctx.transpose, ctx.chunk = transpose, chunk
        return dense_linear_forward(x, weight, bias, A, B)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor):
        x, weight, A, B = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        dx, dA, dB = dense_linear_backward(
            x, weight, A, B, dy, ctx.transpose, ctx.chunk, need_x, need_a, need_b
        )
        return dx, None, None, dA, dB, None, None


def kron_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """``y = x·(W + Σ_k A_k ⊗ B_k)ᵀ + b`` for ``x: (..., n·q)``, ``weight: (m·p, n·q)``, ``bias: (m·p,)`` or
    ``None``, ``A: (r, m, n)``, ``B: (r, p, q)`` → ``(..., m·p)``, through one dense GEMM on the effective
    weight (see the module docstring). ``W`` and ``b`` get no gradient; ``x``, ``A`` and ``B`` do, as through
    ``F.linear(x, W) + kron_apply(x, A, B)``. ``chunk_tokens`` is the factor gradients' chunk (default: by
    device). Under ``torch.autocast`` the product runs in the autocast dtype, like ``F.linear`` would."""
    _, m, n = A.shape
    _, p, q = B.shape
    if weight.shape != (m * p, n * q):
        raise ValueError(
            f"weight of shape {list(weight.shape)} does not match the factors' [{m * p}, {n * q}] "
            f"(A: {list(A.shape)}, B: {list(B.shape)})"
        )
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(
            "kron_linear gives no gradient to weight or bias: pass frozen (requires_grad=False) ones"
        )
    lead = x.shape[:-1]
    device_type = x.device.type
    dtype = x.dtype
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    transpose, chunk_tokens = contraction_plan(A, B, dtype, x.device, chunk_tokens)
    tokens = x.reshape(-1, n * q).to(dtype)
    with torch.autocast(device_type, enabled=False):
        # eager mode keeps the autograd function: the same operators run eagerly gave a median forward+backward
        # 26–34 % slower on a 576² layer at 600 tokens (docs/benchmarks.md, "With custom operators")
        if torch.compiler.is_compiling():  # one opaque operator each way (axolotl_soka.kron.dense_forward_op)
            y = torch.ops.axolotl_soka.kron_linear(tokens, weight, bias, A, B, transpose, chunk_tokens)
        else:
            y = DenseKronLinear.apply(tokens, weight, bias, A, B, transpose, chunk_tokens)
    return y.reshape(*lead, m * p)
