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

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .config import SokaConfig
from .distributed import fetch_on_use, process_info
from .targets import find_targets

CALIBRATION_ATTR = "soka_calibration"


@dataclass
class GradientCalibration:
    """Mean training-loss gradient ``Ḡ: (out, in)`` (fp32, CPU) per target module this process owns.

    Attributes:
        gradients: module name → ``Ḡ``; with several processes only the modules owned by this one.
        batches: batches seen by all processes together.
        tokens: tokens with a label (not ``-100``), all processes together.
        mean_loss: mean training loss over the batches.
        seconds: wall time of the calibration.
    """

    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0
    mean_loss: float = 0.0
    seconds: float = 0.0


def _input_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


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

    The model runs in eval mode (no dropout, so the result depends only on the batches) with every parameter
    frozen; modes and ``requires_grad`` flags are restored afterwards. With ``attach=True`` the result is stored
    on ``model`` for the next ``get_peft_model(model, config)`` (which consumes and removes it). In a
    distributed run every process calls this with its own batches, the same number of them.
    """
    start = time.perf_counter()
    targets = find_targets(model, config)
    rank, world = process_info()
    owner = {t.name: i % world for i, t in enumerate(targets)}
    sums: dict[str, torch.Tensor] = {}

    def fold(name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        grad = dy.reshape(-1, dy.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
        if world > 1:
            dist.reduce(grad, dst=owner[name])
        if rank == owner[name]:
            grad = grad.cpu()
            if name in sums:
                sums[name] += grad
            else:
                sums[name] = grad

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].detach()
            if not output.requires_grad:  # nothing upstream is trainable: start the graph here
                output = output.detach().requires_grad_(True)
            output.register_hook(lambda dy: fold(name, x, dy))
            return output

        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    losses: list[float] = []
    tokens = 0
    device = _input_device(model)
    with fetch_on_use(model):
        handles = [t.linear.register_forward_hook(make_hook(t.name)) for t in targets]
        try:
            for p in flags:
                p.requires_grad_(False)
            model.eval()
            for batch in tqdm(
                batches, desc="SoKA gradient calibration", unit="batch", disable=not progress or rank != 0
            ):
                inputs = {k: v.to(device) for k, v in batch.items()}
                loss = model(**inputs).loss
                loss.backward()
                losses.append(float(loss.detach()))
                tokens += int((inputs["labels"][..., 1:] != -100).sum())
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)
    if not losses:
        raise ValueError("gradient calibration needs at least one batch, got none")
    counts = torch.tensor([len(losses), tokens, sum(losses)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts)
    n_batches = int(counts[0])
    for grad in sums.values():
        grad /= n_batches
    result = GradientCalibration(
        gradients=sums,
        batches=n_batches,
        tokens=int(counts[1]),
        mean_loss=float(counts[2]) / n_batches,
        seconds=time.perf_counter() - start,
    )
    if attach:
        setattr(model, CALIBRATION_ATTR, result)
    return result


def take_calibration(model: nn.Module) -> GradientCalibration | None:
    """The calibration attached to ``model`` by :func:`calibrate_gradients`, removed from it (memory)."""
    calibration = model.__dict__.pop(CALIBRATION_ATTR, None)
    return calibration
