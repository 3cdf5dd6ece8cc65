""":class:`~axolotl_soka.kron.apply_autograd.KronApply` as two custom operators, for ``torch.compile``.

Traced by dynamo, the autograd function's chunk loop is unrolled into one small product per chunk, and
inductor plans a fresh buffer for each one instead of the function's reused scratch tensors: compiled, a
4096² layer's SoKA cost rose from 1.54× to 1.75× its share of the FLOPs on a 2-core CPU (see
``docs/benchmarks.md``). As custom operators the forward and the backward are single opaque nodes of the
graph, which run the same chunked code as eager mode::

    axolotl_soka::kron_apply(x, L, R, transpose, chunk) -> (y, z_kept)
    axolotl_soka::kron_apply_backward(x, L, R, z_kept, dy, transpose, chunk, need_x, need_l, need_r)
        -> (dx, dL, dR)

``x: (N, n, q)``, ``L: (r, m, n)``, ``R: (r, p, q)`` and ``y: (N, m, p)`` (``(N, p, m)`` transposed), as for
:class:`KronApply`. ``z_kept`` is the kept ``(N·n, r)`` intermediate of LoRA-like shapes, or an empty tensor;
a gradient that is not needed is returned empty. Operators may not return ``None`` or a view of an input,
hence the empty tensors and the contiguous copies. The in-place sum into the frozen layer's output is
left to the compiler (``add_to.add_(y)``, which it turns into one fused addition).
"""

from __future__ import annotations

from typing import Any

import torch

from .apply_autograd import _output_shape, keeps_intermediate, kron_backward, kron_forward


@torch.library.custom_op("axolotl_soka::kron_apply", mutates_args=())
def kron_apply_op(
    x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, transpose: bool, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, z_kept)``: ``y[t] = Σ_k L_k x[t] R_kᵀ`` (see :func:`kron_forward`), ``z_kept`` empty if not kept."""
    y, z_kept = kron_forward(x.contiguous(), L, R, transpose, chunk)
    return y, x.new_empty(0) if z_kept is None else z_kept


@kron_apply_op.register_fake
def _(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, transpose: bool, chunk: int):
    r, m_c, n_c = L.shape
    _, p_c, q_c = R.shape
    N = x.shape[0]
    z_shape = (N * n_c, r) if keeps_intermediate(r, p_c, q_c) else (0,)
    return x.new_empty(_output_shape(N, m_c, p_c, transpose)), x.new_empty(z_shape)


@torch.library.custom_op("axolotl_soka::kron_apply_backward", mutates_args=())
def kron_apply_backward_op(
    x: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    z_kept: torch.Tensor,
    dy: torch.Tensor,
    transpose: bool,
    chunk: int,
    need_x: bool,
    need_l: bool,
    need_r: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dL, dR)`` of :func:`kron_apply_op`'s ``y`` (see :func:`kron_backward`), empty where not needed."""
    kept = z_kept if z_kept.numel() else None
    grads = kron_backward(x.contiguous(), L, R, dy, transpose, chunk, need_x, need_l, need_r, kept)
    return operator_grads(grads, (x, L, R))  # type: ignore[return-value]


@kron_apply_backward_op.register_fake
def _(x, L, R, z_kept, dy, transpose, chunk, need_x, need_l, need_r):
    return fake_grads((x, L, R), (need_x, need_l, need_r))


def operator_grads(
    grads: tuple[torch.Tensor | None, ...], inputs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """A backward operator's outputs: each gradient contiguous, an empty tensor (of its input's dtype and
    device) where it is ``None``: operators return neither ``None`` nor strides their fake cannot predict."""
    return tuple(t.new_empty(0) if g is None else g.contiguous() for g, t in zip(grads, inputs, strict=True))


def fake_grads(inputs: tuple[torch.Tensor, ...], needed: tuple[bool, ...]) -> tuple[torch.Tensor, ...]:
    """:func:`operator_grads`'s outputs for the compiler: each input's shape where needed, else empty."""
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip(inputs, needed, strict=True))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, L, R, transpose, chunk = inputs
    ctx.save_for_backward(x, L, R, output[1])
    ctx.transpose, ctx.chunk = transpose, chunk


def _backward(ctx: Any, dy: torch.Tensor, _dz: torch.Tensor) -> tuple:
    x, L, R, z_kept = ctx.saved_tensors
    need_x, need_l, need_r = ctx.needs_input_grad[:3]
    dx, dL, dR = kron_apply_backward_op(x, L, R, z_kept, dy, ctx.transpose, ctx.chunk, need_x, need_l, need_r)
    return dx if need_x else None, dL if need_l else None, dR if need_r else None, None, None


kron_apply_op.register_autograd(_backward, setup_context=_setup_context)
