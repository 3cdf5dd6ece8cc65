""":class:`~axolotl_soka.kron.dense_forward.DenseKronLinear` as two custom operators, for ``torch.compile``.

Traced by dynamo, the dense forward's ``W + ΔW`` became a graph value that the partitioner kept for backward:
one weight-sized tensor per layer (13 GB in bf16 for LLaMA2-7B). As opaque operators the forward and the
backward each form ``W + ΔW`` transiently, as in eager mode, and only ``x``, the weight (a parameter, not a
copy) and the factors are saved::

    axolotl_soka::kron_linear(x, weight, bias, A, B, transpose, chunk) -> y
    axolotl_soka::kron_linear_backward(x, weight, A, B, dy, transpose, chunk, need_x, need_a, need_b)
        -> (dx, dA, dB)

``x: (N, n·q)``, ``weight: (m·p, n·q)``, ``bias: (m·p,)`` or ``None``, ``A: (r, m, n)``, ``B: (r, p, q)`` and
``y: (N, m·p)``; a gradient that is not needed is returned empty. :func:`~axolotl_soka.kron.kron_linear`
calls them through ``torch.ops.axolotl_soka`` when compiling; importing :mod:`axolotl_soka.kron` registers
them.
"""

from __future__ import annotations

from typing import Any

import torch

from .apply_op import fake_grads, operator_grads
from .dense_forward import dense_linear_backward, dense_linear_forward


@torch.library.custom_op("axolotl_soka::kron_linear", mutates_args=())
def kron_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    transpose: bool,
    chunk: int,
) -> torch.Tensor:
    """``y = x·(W + Σ_k A_k ⊗ B_k)ᵀ + b`` (see :func:`dense_linear_forward`)."""
    return dense_linear_forward(x, weight, bias, A, B)


@kron_linear_op.register_fake
def _(x, weight, bias, A, B, transpose, chunk):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("axolotl_soka::kron_linear_backward", mutates_args=())
def kron_linear_backward_op(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)`` of :func:`kron_linear_op` (see :func:`dense_linear_backward`), empty where not needed."""
    grads = dense_linear_backward(x, weight, A, B, dy.contiguous(), transpose, chunk, need_x, need_a, need_b)
    return operator_grads(grads, (x, A, B))  # type: ignore[return-value]


@kron_linear_backward_op.register_fake
def _(x, weight, A, B, dy, transpose, chunk, need_x, need_a, need_b):
    return fake_grads((x, A, B), (need_x, need_a, need_b))


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, _bias, A, B, transpose, chunk = inputs
    ctx.save_for_backward(x, weight, A, B)
    ctx.transpose, ctx.chunk = transpose, chunk


def _backward(ctx: Any, dy: torch.Tensor) -> tuple:
    x, weight, A, B = ctx.saved_tensors
    need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
    dx, dA, dB = kron_linear_backward_op(
        x, weight, A, B, dy, ctx.transpose, ctx.chunk, need_x, need_a, need_b
    )
    return dx if need_x else None, None, None, dA if need_a else None, dB if need_b else None, None, None


kron_linear_op.register_autograd(_backward, setup_context=_setup_context)
