"""Training-step cost on a whole model: seconds per step and saved activations, SoKA vs LoRA and LoKr.

Builds every adapter of the head-to-head benchmark's configurations (``benchmarks/headtohead/methods.py``:
same targets, same parameter budget at each LoRA rank) on its own copy of the model, then times optimiser
steps (forward, backward, gradient clipping, AdamW) in interleaved rounds: each round runs one step of every
model on the same batch, and each model's time is compared with LoRA's at the same rank in that round, so a
shared machine whose speed drifts favours no method. Activation memory is the bytes autograd saves for
backward in one step (parameters excluded), counted by storage. Prints a markdown table.

    python benchmarks/bench_step.py                                   # SmolLM2-135M from the demo, CPU fp32
    python benchmarks/bench_step.py --ranks 4 --methods lora,soka --rounds 5
    python benchmarks/bench_step.py --dense        # also each SoKA method with forward_mode="dense"
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_layer import saved_bytes  # noqa: E402
from headtohead.methods import METHODS, MethodSpec, build, make_config, trainable  # noqa: E402
from headtohead.training import DATA, REPO, collate, encode, read_jsonl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

DEFAULT_METHODS = ("lora", "lokr", "soka", "soka-lora-shape")


def make_step(model: torch.nn.Module) -> Callable[[dict], tuple[float, float]]:
    """One optimiser step on a batch; returns ``(seconds, saved activation MiB)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step(batch: dict) -> tuple[float, float]:
        start = time.perf_counter()
        loss, nbytes = saved_bytes(lambda: model(**batch).loss, exclude=storages)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, nbytes / 2**20

    return step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/models/smollm2-135m-instruct", help="local model folder")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; lora is added")
    parser.add_argument("--ranks", default="4,16", help="LoRA ranks that set the parameter budgets")
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds (after 2 warm-ups)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument(
        "--dense",
        action="store_true",
        help='also run each SoKA method with forward_mode="dense" ("<method>+dense")',
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    args.methods = ["lora"] + [m for m in methods if m != "lora"]
    args.ranks = [int(r) for r in args.ranks.split(",")]
    if not (REPO / args.model / "config.json").exists():
        parser.error(
            f"--model {args.model!r} is not a model folder with config.json; prepare the demo model with "
            "`python -m axolotl_soka.demo.prepare_model` or pass a local Hugging Face model folder"
        )
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model_dir = REPO / args.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = read_jsonl(DATA / "train.jsonl")
    pairs = [encode(tokenizer, r, args.max_len) for r in rows[: args.batch_size * (args.rounds + 2)]]
    batches = [collate(pairs[i : i + args.batch_size], pad_id) for i in range(0, len(pairs), args.batch_size)]

    models: dict[tuple[str, int], torch.nn.Module] = {}
    for rank in args.ranks:
        for method in args.methods:
            spec = MethodSpec(method, rank)
            config = make_config(base, spec, seed=0)
            models[(method, rank)] = build(copy.deepcopy(base), config).train()
            if args.dense and method.startswith("soka"):
                config = make_config(base, spec, seed=0)
                config.forward_mode = "dense"
                models[(f"{method}+dense", rank)] = build(copy.deepcopy(base), config).train()
    steps = {key: make_step(model) for key, model in models.items()}
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in steps}
    mib: dict[tuple[str, int], float] = {}
    for i, batch in enumerate(batches):
        for key, step in steps.items():
            t, mib[key] = step(batch)
            if i >= 2:
                seconds[key].append(t)

    tokens = [int(b["attention_mask"].sum()) for b in batches[2:]]
    print(
        f"torch {torch.__version__}, CPU fp32, threads {torch.get_num_threads()}, {args.model}, batch "
        f"{args.batch_size} × ≤{args.max_len} tokens ({min(tokens)}–{max(tokens)} per batch), "
        f"{args.rounds} interleaved rounds\n"
    )
    print("| run | trainable | s/step | vs LoRA (same rank) | range over rounds | saved activations MiB |")
    print("|---|---:|---:|---:|---|---:|")
    for (method, rank), rounds in seconds.items():
        ratios = sorted(t / lt for t, lt in zip(rounds, seconds[("lora", rank)], strict=True))
        print(
            f"| {method}-r{rank} | {trainable(models[(method, rank)]):,} | {statistics.median(rounds):.3f} | "
            f"{statistics.median(ratios):.2f}× | {ratios[0]:.2f}× … {ratios[-1]:.2f}× | {mib[(method, rank)]:.0f} |"
        )


if __name__ == "__main__":
    main()
