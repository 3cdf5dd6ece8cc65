"""Where the time of SoKA's factored apply goes, against the base layer's GEMM (forward only).

For ``--tokens`` tokens of a 4096-wide layer with balanced 64×64 factors and ``--rank`` terms, times each step
of :func:`axolotl_soka.kron.kron_apply` (B-first order) separately: the first GEMM ``X·Bᵀ``, the permute copy
between the GEMMs, the second GEMM with ``A``, the output transpose; and, for comparison, the base forward
``x·Wᵀ``. Best of ``--repeats``. Prints a markdown table with GMAC/s.

    python benchmarks/profile_kron_apply.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    N, r, m, n, p, q = args.tokens, args.rank, 64, 64, 64, 64
    x = torch.randn(N, n * q)
    a = torch.randn(r, m, n)
    b = torch.randn(r, p, q)
    w = torch.randn(m * p, n * q)
    b2 = b.reshape(r * p, q).T.contiguous()
    a2 = a.permute(1, 0, 2).reshape(m, r * n).T.contiguous()
    t = x.reshape(N * n, q) @ b2
    t_perm = t.reshape(N, n, r, p).permute(0, 3, 2, 1).reshape(N * p, r * n)
    y = (t_perm @ a2).reshape(N, p, m)
    gemm_macs = N * n * q * r * p  # both GEMMs have the same count for square factors
    steps = [
        ("GEMM 1: X·Bᵀ (inner dim q = 64)", lambda: x.reshape(N * n, q) @ b2, gemm_macs),
        (
            "permute copy between the GEMMs",
            lambda: t.reshape(N, n, r, p).permute(0, 3, 2, 1).reshape(N * p, r * n),
            0,
        ),
        ("GEMM 2: ·A (inner dim r·n)", lambda: t_perm @ a2, gemm_macs),
        ("output transpose", lambda: y.transpose(1, 2).reshape(N, m * p), 0),
        ("base forward x·Wᵀ", lambda: x @ w.T, N * w.numel()),
    ]
    print(f"tokens {N}, r {r}, factors 64×64, threads {torch.get_num_threads()}, best of {args.repeats}\n")
    print("| step | ms | GMAC | GMAC/s |")
    print("|---|---:|---:|---:|")
    for name, fn, macs in steps:
        ms = best_ms(fn, args.repeats)
        rate = f"{macs / ms / 1e6:.1f}" if macs else "–"
        print(f"| {name} | {ms:.0f} | {macs / 1e9:.1f} | {rate} |")


if __name__ == "__main__":
    main()
