"""Save a SoKA adapter from any process layout, gathering only the adapter's parameters under ZeRO-3."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
from peft import PeftModel

from .distributed import gathered, process_info


def save_adapter(peft_model: PeftModel, output_dir: str | os.PathLike, **kwargs: Any) -> None:
    """``peft_model.save_pretrained(output_dir)`` on process 0, collective on all processes.

    Under DeepSpeed ZeRO-3 only the ``soka_*`` parameters are gathered (a few MB), never the base model, so
    every process must call this. Extra keyword arguments go to ``save_pretrained``.
    """
    params = [p for name, p in peft_model.named_parameters() if "soka_" in name]
    rank, world = process_info()
    with gathered(params):
        if rank == 0:
            peft_model.save_pretrained(str(output_dir), **kwargs)
    if world > 1:
        dist.barrier()
