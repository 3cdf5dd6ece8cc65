"""What forming ``W + ΔW`` costs next to the factored product: the evidence for ``FORM_COST_PER_ELEMENT``.

For each layer shape, times building ``W + Σ_k A_k ⊗ B_k`` (``axolotl_soka.kron.effective_weight``) into a
fresh tensor and into a reused one (the dense forward's CPU buffer), and the factored product's forward
(``kron_apply``, its two products) over ``--tokens`` tokens. The last column converts the reused build's time
per weight element into multiply-adds at the factored product's measured rate: the number of multiply-adds
the dense forward's cost rule should charge per element formed. Prints a markdown table (medians of
``--repeats`` timings after a warm-up; three significant digits or more, so a slow host never prints 0).

    python benchmarks/bench_dense_weight.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from table_format import significant

from axolotl_soka.kron import contraction_costs, effective_weight, kron_apply

# (out, in, r, [m, n, p, q]): LLaMA-7B's balanced shapes at LoRA r=8's parameters, and SmolLM2-135M's
SHAPES = [
    (4096, 4096, 8, (64, 64, 64, 64)),
    (11008, 4096, 9, (86, 64, 128, 64)),
    (576, 576, 4, (24, 24, 24, 24)),
    (1536, 576, 1, (48, 18, 32, 32)),
]


def seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    out_f: int, in_f: int, r: int, shape: tuple[int, int, int, int], tokens: int, repeats: int
) -> str:
    """One table row for an ``out_f × in_f`` layer with ``r`` terms of ``shape = (m, n, p, q)``."""
    m, n, p, q = shape
    weight, A, B = torch.randn(out_f, in_f), torch.randn(r, m, n), torch.randn(r, p, q)
    x = torch.randn(tokens, in_f)
    buffer = torch.empty(out_f, in_f)
    fresh = seconds(lambda: effective_weight(weight, A, B), repeats)
    reused = seconds(lambda: effective_weight(weight, A, B, out=buffer), repeats)
    factored = seconds(lambda: kron_apply(x, A, B), repeats)
    rate = tokens * r * min(contraction_costs(m, n, p, q)) / factored / 1e9  # GMAC/s of both products
    elements = out_f * in_f
    fresh_ns, reused_ns = fresh / elements * 1e9, reused / elements * 1e9
    # the last column: ns per element × GMAC/s = multiply-adds per element
    cells = (fresh * 1e3, fresh_ns, reused * 1e3, reused_ns, rate, reused_ns * rate)
    return f"| {out_f}x{in_f} | {r} {list(shape)} | " + " | ".join(significant(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, {args.tokens} tokens\n")
    print(
        "| layer | r [m, n, p, q] | W + ΔW fresh: ms | ns/element | reused: ms | ns/element | "
        "factored forward: GMAC/s | reused build in multiply-adds per element |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for out_f, in_f, r, shape in SHAPES:
            print(measure(out_f, in_f, r, shape, args.tokens, args.repeats))


if __name__ == "__main__":
    main()
