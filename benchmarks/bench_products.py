"""Operand layouts of SoKA's factored products, each product timed alone: the evidence for the layouts that
``axolotl_soka/kron/apply_autograd.py`` uses.

For one token chunk of a balanced LLaMA-7B 4096² layer (``--chunk`` tokens, ``[64, 64, 64, 64]``, r = 8) each
backward product is timed in the layout the function used before and in the one it uses now; for the
LoRA-like shape ``(4096, 1, 1, 4096)`` at r = 8 over 2048 tokens, the two orientations of the factor-gradient
accumulation. Prints a markdown table of GMAC/s (median of ``--repeats`` timings of ``--calls`` calls each;
three significant digits or more, so a slow host never prints 0).

    python benchmarks/bench_products.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from table_format import significant


def rate(fn: Callable[[], object], macs: int, calls: int, repeats: int) -> float:
    """GMAC/s of ``fn`` (median over ``repeats`` timings of ``calls`` calls, after two warm-up calls)."""
    fn()
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        seconds.append((time.perf_counter() - start) / calls)
    return macs / statistics.median(seconds) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=32, help="tokens per chunk (the CPU default for 4096²)")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    c, r, m, n, p, q = args.chunk, 8, 64, 64, 64, 64
    xm, r_cat, l_cat = torch.randn(c * n, q), torch.randn(r * p, q), torch.randn(m, n * r)
    l_cat_t, r_cat_t = l_cat.T.contiguous(), r_cat.T.contiguous()
    dyc, dyp = torch.randn(c, m, p), torch.randn(m, p, c)
    zt, dz = torch.empty(r * p, c * n), torch.empty(c, n * r, p)
    dzv = torch.randn(c * n, r * p)
    d_l, d_r, d_r_t = torch.zeros(r, m, n), torch.zeros(r * p, q), torch.zeros(q, r * p)
    macs = c * n * r * p * q
    products = [
        ("recomputed Zᵀ", "R_cat · Xᵀ", lambda: torch.mm(r_cat, xm.T, out=zt)),
        ("recomputed Zᵀ", "(R_catᵀ contiguous)ᵀ · Xᵀ", lambda: torch.mm(r_cat_t.T, xm.T, out=zt)),
        ("dA", "dA += matmul", lambda: d_l.add_(torch.matmul(dyp.view(m, p * c), zt.view(r, p * c, n)))),
        (
            "dA",
            "dA.baddbmm_",
            lambda: d_l.baddbmm_(dyp.view(m, p * c).expand(r, m, p * c), zt.view(r, p * c, n)),
        ),
        ("dZ", "L_cat.T expanded", lambda: torch.bmm(l_cat.T.expand(c, n * r, m), dyc, out=dz)),
        ("dZ", "(L_catᵀ contiguous) expanded", lambda: torch.bmm(l_cat_t.expand(c, n * r, m), dyc, out=dz)),
        ("dB", "dB_cat += dZᵀ · X", lambda: d_r.addmm_(dzv.T, xm)),
        ("dB", "dB_catᵀ += Xᵀ · dZ", lambda: d_r_t.addmm_(xm.T, dzv)),
    ]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, 4096² chunk of {c} tokens, r = {r}\n"
    )
    print("| shape | product | layout | GMAC/s |")
    print("|---|---|---|---:|")
    for product, layout, fn in products:
        gmacs = rate(fn, macs, args.calls, args.repeats)
        print(f"| 4096² balanced | {product} | {layout} | {significant(gmacs)} |")
    tokens, out_f, rank = 2048, 4096, 8
    dy, z = torch.randn(tokens, out_f), torch.randn(tokens, rank)
    tall, wide = torch.zeros(out_f, rank), torch.zeros(rank, out_f)
    lora_macs = tokens * out_f * rank
    for layout, fn in (
        ("tall: (4096, 8) += dYᵀ · Z", lambda: tall.addmm_(dy.T, z)),
        ("wide: (8, 4096) += Zᵀ · dY", lambda: wide.addmm_(z.T, dy)),
    ):
        gmacs = rate(fn, lora_macs, max(1, args.calls // 10), args.repeats)
        print(f"| 4096² LoRA-like, 2048 tokens | dA accumulation | {layout} | {significant(gmacs)} |")


if __name__ == "__main__":
    main()
