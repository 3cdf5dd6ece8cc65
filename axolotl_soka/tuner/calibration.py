"""Gradient calibration: the full-weight gradient of the training loss on each target, summed over batches.

For a target ``y = x Wᵀ`` the weight gradient of one batch is ``G = dyᵀ x`` with ``x: (tokens, in)`` and
``dy: (tokens, out)``. Hooks fold ``G`` into a running fp32 sum on the CPU as soon as backward produces ``dy``, so
no weight ever needs ``requires_grad`` and no per-batch gradient is kept: the extra memory is one ``(out, in)``
fp32 sum per target (over several processes, only for the targets this process will decompose: target ``i``
belongs to process ``i mod world``, as in :func:`axolotl_soka.tuner.initializer.decide_all`; each batch's ``G``
is reduced to its owner). Under DeepSpeed ZeRO-3 the partitioned weights are fetched module by module while the
batches run (:func:`fetch_on_use`).

The mean gradient ``Ḡ = Σ_b G_b / batches`` is what rank selection (``init_source="gradient"``), budget
allocation, shape search and ``init="gradient"`` use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .config import SokaConfig
from .distributed import all_reduce_values, fetch_on_use, process_info
from .targets import find_targets

CALIBRATION_ATTR = "soka_calibration"


@dataclass
class GradientCalibration:
    """Mean training-loss gradient ``Ḡ: (out, in)`` (fp32, CPU) per target module this process owns.

    Attributes:
        gradients: module name → ``Ḡ``; with several processes only the modules owned by this one.
        batches: batches seen by all processes together.
        tokens: tokens with a label (not ``-100``), all processes together.
        mean_loss: mean training loss per labelled token over the batches.
        seconds: wall time of the calibration.
    """

    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0
    mean_loss: float = 0.0  # per labelled token
    seconds: float = 0.0


def _input_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


class _GradientTap(torch.autograd.Function):
    """Identity on a target's output whose backward hands ``dy`` to a callback.

    ``anchor`` (an empty tensor that requires grad) puts the tap in the graph even when nothing upstream of
    the first target is trainable; the output is a fresh tensor, so the model may modify it in place.
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, anchor: torch.Tensor, callback: Callable) -> torch.Tensor:
        ctx.callback = callback
        return output.clone()

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.callback(dy)
        return dy, None, None


def _check_batch(batch: Mapping[str, Any], index: int) -> None:
    missing = [key for key in ("input_ids", "labels") if key not in batch]
    if missing:
        raise ValueError(
            f"calibration batch {index} has no {' or '.join(missing)}; each batch must be a dict with input_ids, "
            "labels (-100 where no loss) and optionally attention_mask, as a causal LM takes them"
        )


def calibrate_gradients(
    model: nn.Module,
    config: SokaConfig,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    attach: bool = True,
    progress: bool = True,
) -> GradientCalibration:
    """Sum ``∂loss/∂W`` of every target of ``config`` over ``batches`` (dicts with ``input_ids``, ``labels`` and
    optionally ``attention_mask``, as a causal LM takes them) and return the mean.

    The model runs in eval mode (no dropout and no gradient-checkpointing recompute, so the result depends
    only on the batches) with every parameter frozen; each module's mode and every ``requires_grad`` flag are
    restored afterwards, also when a batch fails. With ``attach=True`` the result is stored on ``model`` for the
    next ``get_peft_model(model, config)`` (which consumes and removes it). In a distributed run every process
    calls this with its own batches, the same number of them, and every target must take part in every batch
    on every process (each batch's gradient is reduced module by module in backward order; a target that only
    some processes reach, e.g. an unused mixture-of-experts expert, is detected and reported).
    """
    start = time.perf_counter()
    targets = find_targets(model, config)
    rank, world = process_info()
    index = {t.name: i for i, t in enumerate(targets)}
    owner = {t.name: i % world for i, t in enumerate(targets)}
    sums: dict[str, torch.Tensor] = {}
    folds = [0] * len(targets)  # this batch: how often each target's gradient arrived

    def fold(name: str, x: torch.Tensor, version: int, dy: torch.Tensor) -> None:
        if x._version != version:
            raise RuntimeError(
                f"the input of {name!r} was modified in place after the layer used it; its weight gradient "
                "cannot be computed from it"
            )
        grad = dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
        if world > 1:
            dist.reduce(grad, dst=owner[name])
        folds[index[name]] += 1
        if rank == owner[name]:
            grad = grad.cpu()
            if name in sums:
                sums[name] += grad
            else:
                sums[name] = grad

    anchor = torch.zeros(0, requires_grad=True)

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            x = (args[0] if args else kwargs["input"]).detach()
            version = x._version
            return _GradientTap.apply(output, anchor, lambda dy: fold(name, x, version, dy))

        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    loss_sum, tokens, seen = 0.0, 0, 0
    device = _input_device(model)
    with fetch_on_use(model):
        handles = [t.linear.register_forward_hook(make_hook(t.name), with_kwargs=True) for t in targets]
        try:
            for p in flags:
                p.requires_grad_(False)
            model.eval()
            desc = "SoKA gradient calibration"
            for i, batch in enumerate(
                tqdm(batches, desc=desc, unit="batch", disable=not progress or rank != 0)
            ):
                _check_batch(batch, i)
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                folds[:] = [0] * len(targets)
                loss = model(**inputs).loss
                loss.backward()
                _check_folds(folds, targets)
                labelled = int((inputs["labels"][..., 1:] != -100).sum())
                value = float(loss.detach())
                if math.isfinite(value) and labelled:
                    loss_sum += value * labelled
                tokens += labelled
                seen += 1
                del loss, inputs
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
            for module, mode in modes.items():
                module.training = mode
    if not seen:
        raise ValueError("gradient calibration needs at least one batch, got none")
    n_batches, n_tokens, loss_total = all_reduce_values([seen, tokens, loss_sum])
    for grad in sums.values():
        grad /= n_batches
    result = GradientCalibration(
        gradients=sums,
        batches=int(n_batches),
        tokens=int(n_tokens),
        mean_loss=loss_total / n_tokens if n_tokens else float("nan"),
        seconds=time.perf_counter() - start,
    )
    if attach:
        setattr(model, CALIBRATION_ATTR, result)
    return result


def _check_folds(folds: list[int], targets: list) -> None:
    """Every process must have folded every target's gradient equally often in this batch (see above)."""
    most = all_reduce_values(folds, op="max")
    least = [-v for v in all_reduce_values([-f for f in folds], op="max")]
    uneven = [t.name for t, hi, lo in zip(targets, most, least, strict=True) if hi != lo]
    if uneven:
        raise RuntimeError(
            f"gradient calibration: {len(uneven)} target modules (first: {uneven[0]!r}) received a gradient on "
            "some processes and not on others in the same batch, so their reductions do not line up; exclude "
            "them (exclude_modules) or calibrate on one process"
        )


def take_calibration(model: nn.Module) -> GradientCalibration | None:
    """The calibration attached to ``model`` by :func:`calibrate_gradients`, removed from it (memory)."""
    return model.__dict__.pop(CALIBRATION_ATTR, None)
