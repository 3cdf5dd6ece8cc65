"""The head-to-head benchmark's plan and verdicts, on synthetic results: tiers, the grid that grows until its
chosen rate is interior, and verdicts only where the means differ by more than twice the larger std."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from headtohead.methods import MethodSpec, kron_budget, lora_budget, tier_budget  # noqa: E402
from headtohead.plan import LADDER, SIZES, extension, final_runs, grid_runs, parse_tier  # noqa: E402
from headtohead.report import verdicts  # noqa: E402


def _grid(method: str, losses: dict[float, float]) -> list[dict]:
    return [{"config": {"method": method, "lr": lr}, "val_loss": v} for lr, v in losses.items()]


def _final(name: str, losses: list[float], trainable: int = 1000) -> list[dict]:
    return [{"name": name, "val_loss": v, "trainable": trainable} for v in losses]


def test_tiers_parse_and_name_the_runs() -> None:
    assert parse_tier("kron") == ("kron", 1) and parse_tier("r16") == ("lora", 16)
    with pytest.raises(ValueError, match="tier 'r0' is unknown; allowed: kron or r<rank>"):
        parse_tier("r0")
    paper = SIZES["paper"]
    runs = grid_runs(paper, "m", "kron")
    assert {r.spec.name for r in runs} == {f"{m}-kron" for m in paper.tier_methods("kron")}
    assert "vera" in paper.tier_methods("kron") and "lokr-factor" not in paper.tier_methods("kron")
    assert "vera" not in paper.tier_methods("r4") and "lokr-factor" in paper.tier_methods("r4")
    assert len(runs) == 3 * len(paper.tier_methods("kron"))  # three rates each
    final = final_runs(paper, "m", "r1", {m: 1e-3 for m in paper.methods})
    names = [r.spec.name for r in final]
    assert names.count("soka-r1") == names.count("soka-r1@0.75x") == names.count("lora-r1") == 3
    assert sorted({r.seed for r in final}) == [0, 1, 2]


def test_the_grid_extends_until_its_best_rate_is_interior() -> None:
    paper = SIZES["paper"]
    grid = _grid("soka", {1e-4: 0.9, 3e-4: 0.95, 1e-3: 1.0})  # best at the low edge
    grid += _grid("lora", {1e-4: 1.2, 3e-4: 1.0, 1e-3: 0.8})  # best at the high edge
    grid += _grid("lokr", {1e-3: 1.0, 3e-3: 0.9, 1e-2: 0.95})  # interior
    grid += _grid("vera", {1e-3: 1.0, 3e-3: 0.95, 1e-2: 0.9, 3e-2: math.inf})  # next one diverged: interior
    grid += _grid(
        "pissa", {1e-4: math.nan, 3e-4: math.nan, 1e-3: math.nan}
    )  # all diverged: nothing to extend
    more = {(r.method, r.lr) for r in extension(paper, "m", "kron", grid)}
    assert more == {("soka", 3e-5), ("lora", 3e-3)}
    # at the ladder's end the grid stops growing
    edge = _grid("soka", {LADDER[0]: 0.8, LADDER[1]: 0.9})
    assert not [r for r in extension(paper, "m", "kron", edge) if r.method == "soka"]


def test_verdicts_need_twice_the_larger_std() -> None:
    final = (
        _final("lora-kron", [1.00, 1.01, 0.99])
        + _final("lokr-kron", [0.98, 0.99, 0.97])  # the best peer (mean 0.98)
        + _final("soka-kron", [0.90, 0.91, 0.89])  # 0.08 below, std 0.01: wins
        + _final("soka-zero-kron", [0.99, 0.97, 1.01])  # 0.01 above, std 0.02: within noise
        + _final("soka-grad-kron", [1.10, 1.11, 1.09])  # loses
        + _final("soka-kron@0.75x", [0.95])  # one seed: no verdict
    )
    text = {line.split(" (")[0].removeprefix("- "): line for line in verdicts(final)}
    assert "wins against the best peer lokr-kron" in text["soka-kron"]
    assert "is within noise of the best peer lokr-kron" in text["soka-zero-kron"]
    assert "loses to the best peer lokr-kron" in text["soka-grad-kron"]
    assert "has one seed, no verdict" in text["soka-kron@0.75x"]
    assert "0.9000 ± 0.0100 vs 0.9800 ± 0.0100 (-8.2%), 3 seed(s)" in text["soka-kron"]


def test_the_kronecker_tier_is_one_balanced_term_with_its_sigma_per_target() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj, self.up_proj = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 96)
            self.head = nn.Linear(64, 10)  # not a target

    model = nn.ModuleList([Block(), Block()])
    # 64x64 → (8, 8, 8, 8): 129; 32x64 → 4·8 + 8·8 + 1 = 97; 96x64 → 8·8 + 12·8 + 1 = 161
    assert kron_budget(model) == 2 * (129 + 97 + 161)
    assert tier_budget(model, MethodSpec("soka", 1, 0.75, "kron")) == round(0.75 * 2 * (129 + 97 + 161))
    assert tier_budget(model, MethodSpec("lora", 4)) == lora_budget(model, 4) == 2 * 4 * (128 + 96 + 160)
