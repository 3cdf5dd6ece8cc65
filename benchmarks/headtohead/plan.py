"""Which runs a benchmark size makes: per budget tier a learning-rate grid, then the chosen rates for every seed.

A tier is written ``"kron"`` (one balanced Kronecker term per module) or ``"r<N>"`` (LoRA's count at rank N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from .methods import LR_FROM, LR_GRIDS, METHODS
from .training import RunConfig, TrainSettings

SOKA_FRACTION = 0.75  # the paper's claim: SoKA at 25 % fewer parameters than LoRA
#: the rates a grid may extend to, half a decade apart, when its best rate sits at an edge
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: methods measured only at some tiers: VeRA at the Kronecker tier (its count cannot reach LoRA r=4's on
#: SmolLM2 without a rank above the width); LoKr with a decompose_factor where LoKr's default count falls short
ONLY_AT = {"vera": ("kron",), "lokr-factor": ("r1", "r4", "r16")}


@dataclass
class Size(TrainSettings):
    """A benchmark size: the training settings of its runs and which tiers, seeds and grids it covers."""

    grid_tiers: tuple[str, ...]
    final_tiers: tuple[str, ...]
    seeds: tuple[int, ...]
    grid: bool = True
    #: extend each grid by LADDER until its best rate is interior (a diverged neighbour counts as interior)
    extend: bool = False
    #: start runs from a preloaded fork server instead of fresh interpreters (faster; peak RSS not comparable)
    fork_runs: bool = False
    #: runs at a time (each a fresh interpreter with ``threads`` torch threads; 0 threads: torch's default)
    jobs: int = 1
    threads: int = 0
    methods: tuple[str, ...] = field(default=METHODS)

    def tier_methods(self, tier: str) -> tuple[str, ...]:
        return tuple(m for m in self.methods if tier in ONLY_AT.get(m, (tier,)))


_PAPER_METHODS = ("soka", "lokr", "lora", "vera", "soka-zero", "pissa", "soka-grad", "lokr-factor")

SIZES = {
    # a few steps of everything, for the test that keeps this script from rotting
    "quick": Size(
        3, 2, 96, 6, 4, 2, 8, grid_tiers=("r4",), final_tiers=("r4",), seeds=(0,), grid=False, fork_runs=True
    ),
    # about two hours on a 2-core CPU: the grid at one budget and seed, then both budgets
    "cpu": Size(80, 2, 160, 160, 32, 40, 160, grid_tiers=("r4",), final_tiers=("r4", "r16"), seeds=(0,)),
    # the paper's regime on a 2-core CPU, a protocol that supports a verdict: 300 steps over 600 rows seen once,
    # 128 validation rows, 200 test problems, a grid per method and tier made interior, three seeds; two runs
    # at a time with one thread each. The Kronecker tier first: it spans sessions (runs resume).
    "paper": Size(
        300,
        2,
        160,
        600,
        128,
        200,
        160,
        grid_tiers=("kron", "r1", "r4"),
        final_tiers=("kron", "r1", "r4"),
        seeds=(0, 1, 2),
        extend=True,
        jobs=2,
        threads=1,
        methods=_PAPER_METHODS,
    ),  # fmt: skip
    # for a GPU: longer training, all tiers, three seeds
    "full": Size(
        600,
        8,
        384,
        1600,
        128,
        300,
        256,
        grid_tiers=("kron", "r1", "r4"),
        final_tiers=("kron", "r1", "r4", "r16"),
        seeds=(0, 1, 2),
        extend=True,
        methods=_PAPER_METHODS,
    ),  # fmt: skip
}


def parse_tier(tier: str) -> tuple[str, int]:
    """``"kron"`` → ``("kron", 1)`` (LoRA and PiSSA then take the closest rank); ``"r4"`` → ``("lora", 4)``."""
    if tier == "kron":
        return "kron", 1
    if tier.startswith("r") and tier[1:].isdigit() and int(tier[1:]) > 0:
        return "lora", int(tier[1:])
    raise ValueError(f"tier {tier!r} is unknown; allowed: kron or r<rank>")


def base_config(size: Size, model_dir: str, method: str, tier: str, lr: float, seed: int) -> RunConfig:
    settings = {f.name: getattr(size, f.name) for f in fields(TrainSettings)}
    kind, rank = parse_tier(tier)
    return RunConfig(
        **settings, model_dir=model_dir, method=method, lora_rank=rank, fraction=1.0, lr=lr, seed=seed,
        tier=kind, threads=size.threads,
    )  # fmt: skip


def grid_runs(size: Size, model_dir: str, tier: str) -> list[RunConfig]:
    """Every method at every rate of its grid (or its middle rate without a grid), first seed, at ``tier``.

    Methods in ``LR_FROM`` have no grid: they run in the final stage at their sibling's chosen rate."""
    runs = []
    for method in size.tier_methods(tier):
        if method in LR_FROM:
            continue
        rates = LR_GRIDS[method] if size.grid else (LR_GRIDS[method][1],)
        runs += [base_config(size, model_dir, method, tier, lr, size.seeds[0]) for lr in rates]
    return runs


def extension(size: Size, model_dir: str, tier: str, grid: list[dict]) -> list[RunConfig]:
    """The next rate outward for each method whose best finite rate sits at an edge of the rates run so far
    (empty when every best rate is interior, its outer neighbour diverged, or the ladder ends)."""
    runs = []
    for method in size.tier_methods(tier):
        if method in LR_FROM:
            continue
        losses = {r["config"]["lr"]: r["val_loss"] for r in grid if r["config"]["method"] == method}
        finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
        if not finite:
            continue
        best = min(finite, key=finite.get)
        step = -1 if best == min(losses) else 1 if best == max(losses) else 0
        index = LADDER.index(best) + step if best in LADDER else -1
        if step and 0 <= index < len(LADDER):
            runs.append(base_config(size, model_dir, method, tier, LADDER[index], size.seeds[0]))
    return runs


def final_runs(size: Size, model_dir: str, tier: str, best_lr: dict[str, float]) -> list[RunConfig]:
    """Each method at its chosen rate, every seed, at ``tier``; SoKA also at 0.75× the tier's count."""
    runs = []
    for seed in size.seeds:
        for method in size.tier_methods(tier):
            run = base_config(size, model_dir, method, tier, best_lr[LR_FROM.get(method, method)], seed)
            runs.append(run)
            if method == "soka":
                runs.append(replace(run, fraction=SOKA_FRACTION))
    return runs
