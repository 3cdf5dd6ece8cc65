"""Scale check of rank selection under a global parameter budget on LLaMA2-7B-shaped weights.

32 layers × (q, k, v, o: 4096×4096; gate, up: 11008×4096; down: 4096×11008) = 224 matrices with random
weights. A full fp32 7B model needs 27 GB, so the weights are generated one matrix at a time (seeded) and fed
through the same per-module decision (:func:`axolotl_soka.tuner.initializer.decide_module`: KPSVD + energy /
elbow caps) and the same budget allocation the tuner runs; only the model object is missing. Prints the time
of the whole selection, the trainable count against the budget, and where the budget went.

``--init-source gradient`` selects on a synthetic gradient per matrix instead (``Ḡ = dyᵀ x / T`` over
``--tokens`` random tokens, so of rank ≤ T like a real calibrated gradient; the calibration forward/backward
itself is not part of this check). ``--factor-shape auto`` adds the per-module shape search.

    python benchmarks/bench_budget.py --budget 0.99M
    python benchmarks/bench_budget.py --budget 0.99M --init-source gradient --factor-shape auto
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

import torch
from tqdm.auto import tqdm

from axolotl_soka import SokaConfig
from axolotl_soka.kron import balanced_shape, parse_budget
from axolotl_soka.tuner.initializer import ModuleInit, apply_budget, decide_module, module_budgets
from axolotl_soka.tuner.targets import Target

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
    parser.add_argument("--init-source", choices=["weight", "gradient"], default="weight")
    parser.add_argument("--factor-shape", choices=["balanced", "auto"], default="balanced")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of each synthetic gradient")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config = SokaConfig(
        param_budget=args.budget, min_rank=0, max_rank=args.max_rank, svd=args.svd, search_window=64,
        init_source=args.init_source, factor_shape=args.factor_shape,
    )  # fmt: skip
    budget = parse_budget(args.budget)
    generator = torch.Generator(device=args.device).manual_seed(0)
    results: dict[str, ModuleInit] = {}
    auto = args.factor_shape == "auto"
    targets = [
        Target(f"model.layers.{layer}.{name}", torch.nn.Linear(in_f, out_f, device="meta"),
               None if auto else balanced_shape(out_f, in_f))
        for layer in range(args.layers)
        for name, (out_f, in_f) in SHAPES.items()
    ]  # fmt: skip
    budgets = module_budgets(config, targets) if auto else {}
    start = time.perf_counter()
    decide_seconds = 0.0
    with tqdm(total=len(targets), desc="KPSVD + selection", unit="matrix") as progress:
        for target in targets:
            out_f, in_f = target.linear.out_features, target.linear.in_features
            weight = torch.randn(out_f, in_f, generator=generator, device=args.device) * 0.02
            gradient = None
            if args.init_source == "gradient":
                dy = torch.randn(args.tokens, out_f, generator=generator, device=args.device)
                x = torch.randn(args.tokens, in_f, generator=generator, device=args.device)
                gradient = dy.T @ x / args.tokens
            t0 = time.perf_counter()
            results[target.name] = decide_module(
                config, target.name, weight, target.shape, gradient, budgets.get(target.name)
            )
            decide_seconds += time.perf_counter() - t0
            progress.update(1)
    t0 = time.perf_counter()
    apply_budget(config, results, targets)
    allocate_seconds = time.perf_counter() - t0
    total_seconds = time.perf_counter() - start
    cost = {key: init.shape.params_per_term + 1 for key, init in results.items()}
    trainable = sum(results[k].decision.rank * cost[k] for k in results)
    by_type: dict[str, list[int]] = defaultdict(list)
    for key, init in results.items():
        by_type[key.rsplit(".", 1)[-1]].append(init.decision.rank)
    print(
        f"\ndevice {args.device}, svd={args.svd}, max_rank={args.max_rank}, init_source={args.init_source}, "
        f"factor_shape={args.factor_shape}, {len(results)} matrices"
    )
    print("\n| budget | trainable | off by | modules adapted | KPSVD+select s | allocation s | total s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    adapted = sum(1 for r in results.values() if r.decision.rank > 0)
    print(
        f"| {budget:,} | {trainable:,} | {(trainable - budget) / budget:+.2%} | {adapted}/{len(results)} "
        f"| {decide_seconds:.1f} | {allocate_seconds:.3f} | {total_seconds:.1f} |"
    )
    shapes_by_type: dict[str, Counter] = defaultdict(Counter)
    for key, init in results.items():
        shapes_by_type[key.rsplit(".", 1)[-1]][tuple(init.shape.as_list())] += 1
    print("\n| module | terms (sum over layers) | layers adapted | rank histogram | shapes |")
    print("|---|---:|---:|---|---|")
    for name, ranks in by_type.items():
        hist = ", ".join(f"{r}: {c}" for r, c in sorted(Counter(ranks).items()))
        shapes = ", ".join(f"{list(s)}×{c}" for s, c in shapes_by_type[name].most_common())
        print(f"| {name} | {sum(ranks)} | {sum(1 for r in ranks if r)} | {hist} | {shapes} |")


if __name__ == "__main__":
    main()
