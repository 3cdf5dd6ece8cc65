"""Which runs a benchmark size makes: a learning-rate grid at one budget, then the chosen rates everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .methods import LR_FROM, LR_GRIDS, METHODS
from .training import RunConfig, TrainSettings

SOKA_FRACTION = 0.75  # the paper's claim: SoKA at 25 % fewer parameters than LoRA


@dataclass
class Size(TrainSettings):
    """A benchmark size: the training settings of its runs and which budgets, seeds and grid it covers."""

    grid_rank: int
    final_ranks: tuple[int, ...]
    seeds: tuple[int, ...]
    grid: bool = True
    #: start runs from a preloaded fork server instead of fresh interpreters (faster; peak RSS not comparable)
    fork_runs: bool = False
    methods: tuple[str, ...] = field(default=METHODS)


SIZES = {
    # a few steps of everything, for the test that keeps this script from rotting
    "quick": Size(
        3, 2, 96, 6, 4, 2, 8, grid_rank=4, final_ranks=(4,), seeds=(0,), grid=False, fork_runs=True
    ),
    # about two hours on a 2-core CPU: the grid at one budget and seed, then both budgets
    "cpu": Size(80, 2, 160, 160, 32, 40, 160, grid_rank=4, final_ranks=(4, 16), seeds=(0,)),
    # for a GPU: longer training, all budgets, three seeds
    "full": Size(600, 8, 384, 1600, 128, 300, 256, grid_rank=4, final_ranks=(4, 16), seeds=(0, 1, 2)),
}


def base_config(size: Size, model_dir: str, method: str, rank: int, lr: float, seed: int) -> RunConfig:
    settings = {f.name: getattr(size, f.name) for f in fields(TrainSettings)}
    return RunConfig(
        **settings, model_dir=model_dir, method=method, lora_rank=rank, fraction=1.0, lr=lr, seed=seed
    )


def grid_runs(size: Size, model_dir: str) -> list[RunConfig]:
    """Every method at every rate of its grid (or its middle rate without a grid), first seed, grid budget.

    Methods in ``LR_FROM`` have no grid: they run in the final stage at their sibling's chosen rate."""
    runs = []
    for method in size.methods:
        if method in LR_FROM:
            continue
        rates = LR_GRIDS[method] if size.grid else (LR_GRIDS[method][1],)
        runs += [base_config(size, model_dir, method, size.grid_rank, lr, size.seeds[0]) for lr in rates]
    return runs


def final_runs(size: Size, model_dir: str, best_lr: dict[str, float]) -> list[RunConfig]:
    """Each method at its chosen rate, every budget and seed; SoKA also at 0.75× the budget."""
    runs = []
    for rank in size.final_ranks:
        for seed in size.seeds:
            for method in size.methods:
                run = base_config(size, model_dir, method, rank, best_lr[LR_FROM.get(method, method)], seed)
                runs.append(run)
                if method == "soka":
                    runs.append(replace(run, fraction=SOKA_FRACTION))
    return runs
