"""Run an Axolotl CLI module under DeepSpeed on CPU processes (gloo), for the tests only.

``accelerate launch --multi_gpu --num_processes 2 tests/plugin/cpu_launch.py axolotl.cli.train CONFIG``

Axolotl and accelerate choose their communication backend for GPUs; on a machine without one this module
changes only that choice, before running the named module unchanged:
- ``deepspeed.comm.init_distributed``, which Axolotl's ``setup_deepspeed_env`` calls with ``"nccl"`` in a
  single process (as ``merge_lora`` does), gets ``"gloo"``;
- accelerate's ``PartialState`` finds no accelerator and would start every rank as a one-process run; with
  ``WORLD_SIZE > 1`` it now reports a multi-CPU gloo run (so DeepSpeed sees the real world size);
- ``torch.cuda.can_device_access_peer``, which Axolotl asks about peer access between GPUs, answers "no"
  instead of raising on a CUDA build of torch with no driver;
- ``DS_ACCELERATOR=cpu`` and a loopback ``MASTER_ADDR`` unless set.

With ``SOKA_RECORD_DIR`` set, each process also appends the name of every module it decomposes to
``SOKA_RECORD_DIR/decisions-rank{RANK}.txt`` (the tests check each module is decomposed exactly once).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any


def patch_backends() -> None:
    """Make DeepSpeed and accelerate use gloo on CPU processes (see the module docstring)."""
    import deepspeed.comm
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    init_distributed = deepspeed.comm.init_distributed

    def gloo_init_distributed(dist_backend: str | None = None, *args: Any, **kwargs: Any) -> Any:
        return init_distributed("gloo" if dist_backend in (None, "nccl") else dist_backend, *args, **kwargs)

    deepspeed.comm.init_distributed = gloo_init_distributed

    prepare_backend = PartialState._prepare_backend

    def cpu_prepare_backend(
        self: PartialState, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None
    ) -> tuple[str | None, DistributedType]:
        chosen, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        if kind == DistributedType.NO and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    PartialState._prepare_backend = cpu_prepare_backend

    if not torch.cuda.is_available():
        torch.cuda.can_device_access_peer = lambda device, peer_device: False


def record_decisions(directory: str) -> None:
    """Append each module name ``decide_module`` is called for to ``directory/decisions-rank{RANK}.txt``."""
    from pathlib import Path

    from axolotl_soka.tuner import initializer

    decide_module = initializer.decide_module
    path = Path(directory) / f"decisions-rank{os.environ.get('RANK', '0')}.txt"

    def recorded(config: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        with path.open("a", encoding="utf-8") as f:
            f.write(name + "\n")
        return decide_module(config, name, *args, **kwargs)

    initializer.decide_module = recorded


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    patch_backends()
    if os.environ.get("SOKA_RECORD_DIR"):
        record_decisions(os.environ["SOKA_RECORD_DIR"])
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
