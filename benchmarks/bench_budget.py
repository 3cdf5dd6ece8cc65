"""Scale check of rank selection under a global parameter budget on LLaMA2-7B-shaped weights.

32 layers × (q, k, v, o: 4096×4096; gate, up: 11008×4096; down: 4096×11008) = 224 matrices with random
weights. A full fp32 7B model needs 27 GB, so the weights are generated one matrix at a time (seeded) and fed
through the same per-module decision (:func:`axolotl_soka.tuner.initializer.decide_module`: KPSVD + energy /
elbow caps) and the same budget allocation the tuner runs; only the model object is missing. Prints the time
of the whole selection, the trainable count against the budget, and where the budget went.

    python benchmarks/bench_budget.py --budget 0.99M
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

import torch
from tqdm.auto import tqdm

from axolotl_soka import SokaConfig
from axolotl_soka.kron import balanced_shape, parse_budget
from axolotl_soka.tuner.initializer import ModuleInit, apply_budget, decide_module

SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="0.99M")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--max-rank", type=int, default=8)
    parser.add_argument("--svd", choices=["full", "lowrank"], default="lowrank")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config = SokaConfig(
        param_budget=args.budget, min_rank=0, max_rank=args.max_rank, svd=args.svd, search_window=64
    )
    budget = parse_budget(args.budget)
    generator = torch.Generator(device=args.device).manual_seed(0)
    results: dict[str, ModuleInit] = {}
    targets = []
    start = time.perf_counter()
    decide_seconds = 0.0
    with tqdm(total=args.layers * len(SHAPES), desc="KPSVD + selection", unit="matrix") as progress:
        for layer in range(args.layers):
            for name, (out_f, in_f) in SHAPES.items():
                key = f"model.layers.{layer}.{name}"
                weight = torch.randn(out_f, in_f, generator=generator, device=args.device) * 0.02
                shape = balanced_shape(out_f, in_f)
                t0 = time.perf_counter()
                results[key] = decide_module(config, key, weight, shape)
                decide_seconds += time.perf_counter() - t0
                targets.append((key, None, shape))
                progress.update(1)
    t0 = time.perf_counter()
    apply_budget(config, results, targets)
    allocate_seconds = time.perf_counter() - t0
    total_seconds = time.perf_counter() - start
    cost = {key: shape.params_per_term + 1 for key, _, shape in targets}
    trainable = sum(results[k].decision.rank * cost[k] for k in results)
    by_type: dict[str, list[int]] = defaultdict(list)
    for key, init in results.items():
        by_type[key.rsplit(".", 1)[-1]].append(init.decision.rank)
    print(f"\ndevice {args.device}, svd={args.svd}, max_rank={args.max_rank}, {len(results)} matrices")
    print("\n| budget | trainable | off by | modules adapted | KPSVD+select s | allocation s | total s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    adapted = sum(1 for r in results.values() if r.decision.rank > 0)
    print(
        f"| {budget:,} | {trainable:,} | {(trainable - budget) / budget:+.2%} | {adapted}/{len(results)} "
        f"| {decide_seconds:.1f} | {allocate_seconds:.3f} | {total_seconds:.1f} |"
    )
    print("\n| module | terms (sum over layers) | layers adapted | rank histogram |")
    print("|---|---:|---:|---|")
    for name, ranks in by_type.items():
        hist = ", ".join(f"{r}: {c}" for r, c in sorted(Counter(ranks).items()))
        print(f"| {name} | {sum(ranks)} | {sum(1 for r in ranks if r)} | {hist} |")


if __name__ == "__main__":
    main()
