"""Collective helpers so initialisation works on a single process, under DDP and under DeepSpeed ZeRO-3.

Under ZeRO-3 every weight is partitioned (``weight.shape == (0,)``, full shape in ``weight.ds_shape``), so reading
it needs a collective gather on *all* processes in the same order, and writing it needs ``modifier_rank`` (that
process's values are re-partitioned to everyone on exit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Inside: the full data of ``params`` (collective under ZeRO-3; a no-op otherwise).

    ``modifier_rank=None`` for reading; an integer for writing (that rank's values win on exit).

    Several parameters are gathered in one coalesced call only where that is safe (:func:`coalesced_gather_is_safe`);
    elsewhere one at a time, each a blocking gather.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    groups = [partitioned] if coalesced_gather_is_safe() else [[p] for p in partitioned]
    with contextlib.ExitStack() as stack:
        for group in groups:
            stack.enter_context(deepspeed.zero.GatheredParameters(group, modifier_rank=modifier_rank))
        yield


def coalesced_gather_is_safe() -> bool:
    """Whether DeepSpeed's coalesced gather of several ZeRO-3 parameters can be used: under NCCL, not under
    gloo (CPU). DeepSpeed 0.18's ``_allgather_params_coalesced`` launches one asynchronous all-gather per
    parameter and waits on the last one only, which orders them on a GPU stream but not on gloo's worker
    threads: the earlier gathers may still be writing into their buffers after the call returns. On a CPU this
    corrupted weights in about half the runs of a 2-process test (a module with a weight and a bias, gathered
    together, as transformers' ZeRO-3 loading does); gathered one at a time, or with DeepSpeed's
    ``stage3_allgather_sequential: true``, never. DeepSpeed 0.19.8 (the Python 3.12 stack) waits on every
    transfer (pull request #8539); 0.18.9 (axolotl 0.19's) does not, so gloo keeps one gather at a time."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "nccl"


def process_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int) -> Any:
    """``obj`` from process ``src`` on every process (tensors inside travel on the CPU)."""
    _, world = process_info()
    if world == 1:
        return obj
    holder = [obj]
    device = collective_device()
    dist.broadcast_object_list(holder, src=src, device=None if device.type == "cpu" else device)
    return holder[0]


def all_reduce_values(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum (or ``"max"``) of ``values`` over all processes (a no-op on one process)."""
    _, world = process_info()
    if world == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


@contextlib.contextmanager
def fetch_on_use(model: torch.nn.Module) -> Iterator[None]:
    """Inside: a plain ``model(...)`` and ``loss.backward()`` work on a ZeRO-3 partitioned model (a no-op otherwise).

    DeepSpeed's own fetch/release hooks (those its engine installs) are registered on ``model``, so each module's
    parameters are gathered when the forward or backward pass reaches it and released after; they are removed
    on exit, leaving the model as it was for ``deepspeed.initialize``.
    """
    if not any(is_partitioned(p) for p in model.parameters()):
        yield
        return
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    offload = DeepSpeedZeRoOffload(model, timers=NoopTimer(), ds_config=None, overlap_comm=False)
    try:
        yield
    finally:
        offload.partition_all_parameters()
        offload.destroy()
