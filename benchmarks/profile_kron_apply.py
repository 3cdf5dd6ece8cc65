"""Where the time of SoKA's factored apply goes: one forward+backward of ``kron_apply``, op by op.

For ``--tokens`` tokens of an ``out × in`` layer with balanced factors and ``--rank`` terms, profiles
:func:`axolotl_soka.kron.kron_apply` forward and backward (input and factors requiring grad) with
``torch.profiler`` and groups the time by operator and input shapes; for the matrix products it gives the
multiply-add rate. The base layer's forward GEMM ``x·Wᵀ`` is timed the same way for comparison. Prints a
markdown table (per step: total over the token chunks).

    python benchmarks/profile_kron_apply.py
    python benchmarks/profile_kron_apply.py --out 11008 --in 4096 --rank 9
    python benchmarks/profile_kron_apply.py --chunk-tokens 2048      # all tokens in one chunk
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.profiler import ProfilerActivity, profile

from axolotl_soka.kron import balanced_shape, kron_apply


def matmul_macs(name: str, shapes: list[list[int]]) -> int:
    """Multiply-adds of an ``aten::mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` call from its input shapes
    (0 for other ops)."""
    if name == "aten::mm" and len(shapes) >= 2 and len(shapes[0]) == 2:
        (m, k), (_, n) = shapes[0], shapes[1]
        return m * k * n
    if name in ("aten::addmm", "aten::addmm_") and len(shapes) >= 3 and len(shapes[1]) == 2:
        (m, k), (_, n) = shapes[1], shapes[2]
        return m * k * n
    if name == "aten::bmm" and len(shapes) >= 2 and len(shapes[0]) == 3:
        (b, m, k), (_, _, n) = shapes[0], shapes[1]
        return b * m * k * n
    if name in ("aten::baddbmm", "aten::baddbmm_") and len(shapes) >= 3 and len(shapes[1]) == 3:
        (b, m, k), (_, _, n) = shapes[1], shapes[2]
        return b * m * k * n
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", type=int, default=4096, help="out_features")
    parser.add_argument("--in", dest="in_features", type=int, default=4096, help="in_features")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps (after one warm-up)")
    parser.add_argument(
        "--chunk-tokens", type=int, default=None, help="tokens per chunk (default: kron_apply's own choice)"
    )
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = balanced_shape(args.out, args.in_features)
    r, (m, n, p, q) = args.rank, shape.as_list()
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    a = (torch.randn(r, m, n) / math.sqrt(n)).requires_grad_()
    b = (torch.randn(r, p, q) / math.sqrt(q)).requires_grad_()
    w = torch.randn(args.out, args.in_features)
    grad = torch.randn(args.tokens, args.out)

    def step() -> None:
        kron_apply(x, a, b, chunk_tokens=args.chunk_tokens).backward(grad)

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.repeats):
            step()
    events = prof.key_averages(group_by_input_shape=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    x.detach() @ w.T
    start = time.perf_counter()
    for _ in range(args.repeats):
        x.detach() @ w.T
    base_ms = (time.perf_counter() - start) / args.repeats * 1e3

    print(
        f"tokens {args.tokens}, {args.out}x{args.in_features}, shape {shape.as_list()}, r {r}, "
        f"chunk {args.chunk_tokens or 'default'}, threads {torch.get_num_threads()}, "
        f"mean of {args.repeats} profiled steps\n"
    )
    print("| op | input shapes | calls/step | ms/step | share | GMAC/s |")
    print("|---|---|---:|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        ms = e.self_cpu_time_total / args.repeats / 1e3
        macs = matmul_macs(e.key, e.input_shapes) * e.count / args.repeats
        rate = f"{macs / ms / 1e6:.1f}" if macs and ms > 0 else "–"
        shapes = " ".join(str(s) for s in e.input_shapes if s)
        print(
            f"| {e.key} | {shapes} | {e.count / args.repeats:.0f} | {ms:.1f} | "
            f"{e.self_cpu_time_total / total_us:.0%} | {rate} |"
        )
    print(f"| **all ops of kron_apply fwd+bwd** | | | {total_us / args.repeats / 1e3:.1f} | 100% | |")
    base_macs = args.tokens * args.out * args.in_features
    print(f"| base forward x·Wᵀ (for comparison) | | 1 | {base_ms:.1f} | | {base_macs / base_ms / 1e6:.1f} |")


if __name__ == "__main__":
    main()
