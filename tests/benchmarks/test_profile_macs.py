"""``profile_kron_apply.matmul_macs``: multiply-adds from the profiler's recorded input shapes."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    from profile_kron_apply import matmul_macs
finally:
    sys.path.pop(0)


def test_every_product_op_counts_its_multiply_adds() -> None:
    assert matmul_macs("aten::mm", [[2048, 64], [64, 512], [2048, 512]]) == 2048 * 64 * 512
    assert matmul_macs("aten::addmm_", [[64, 512], [64, 2048], [2048, 512]]) == 64 * 2048 * 512
    assert matmul_macs("aten::bmm", [[32, 64, 512], [32, 512, 64], [32, 64, 64]]) == 32 * 64 * 512 * 64
    # baddbmm_(self, batch1, batch2): self is the accumulator
    assert matmul_macs("aten::baddbmm_", [[8, 64, 64], [8, 64, 2048], [8, 2048, 64]]) == 8 * 64 * 2048 * 64
    assert matmul_macs("aten::copy_", [[64, 64, 32], [64, 64, 32]]) == 0
