"""SoKA initialisation time under DeepSpeed ZeRO-3 with 1 and 2 processes (decompositions spread over them).

Builds a LLaMA-shaped model with random weights from a config (no download), saves it, and for each process
count launches ``torchrun`` on this file in worker mode: the model is loaded partitioned under ZeRO-3 and
``get_peft_model(model, SokaConfig(...))`` is timed on every process. Prints a markdown table.

    python benchmarks/bench_init.py                                 # CPU, gloo, 1 thread per process
    python benchmarks/bench_init.py --hidden 2048 --layers 16 --backend nccl   # on GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from axolotl_soka import SokaConfig

    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            # on gloo DeepSpeed's coalesced gather does not wait for all of its transfers (see
            # axolotl_soka.tuner.distributed.coalesced_gather_is_safe); transformers' loading uses it
            "stage3_allgather_sequential": args.backend != "nccl",
        },
    }
    deepspeed.init_distributed(dist_backend=args.backend)
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    dist.barrier()
    start = time.perf_counter()
    peft_model = get_peft_model(model, SokaConfig(max_rank=args.max_rank, svd=args.svd))
    dist.barrier()
    seconds = time.perf_counter() - start
    terms = sum(s.rank for s in peft_model.base_model.soka_selections["default"].values())
    if dist.get_rank() == 0:
        print(
            json.dumps(
                {
                    "seconds": seconds,
                    "terms": terms,
                    "modules": len(peft_model.base_model.soka_selections["default"]),
                }
            )
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-rank", type=int, default=8)
    parser.add_argument("--svd", choices=["full", "lowrank"], default="lowrank")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process (CPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as model_dir:
        config = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 128),
            num_key_value_heads=max(1, args.hidden // 128),
            vocab_size=1000,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model_dir)
        print(
            f"model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers "
            f"({7 * args.layers} target matrices), svd={args.svd}, max_rank={args.max_rank}, backend={args.backend}"
        )
        print("\n| processes | threads/process | init seconds | modules | terms |")
        print("|---:|---:|---:|---:|---:|")
        for procs in args.procs:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
            if args.backend == "gloo":
                env["DS_ACCELERATOR"] = "cpu"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                "--master_port", str(free_port()), __file__, "--worker", "--model-dir", model_dir,
                "--max-rank", str(args.max_rank), "--svd", args.svd, "--backend", args.backend,
            ]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"worker with {procs} processes failed")
            result = json.loads(lines[-1])
            print(
                f"| {procs} | {args.threads} | {result['seconds']:.2f} | {result['modules']} | {result['terms']} |"
            )


if __name__ == "__main__":
    main()
