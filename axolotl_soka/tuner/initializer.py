"""Decide every target module's rank and initial factors before any module is replaced.

One pass over the targets, in the same order on every process. On one process each weight is read (gathered
under ZeRO-3) and decomposed in turn, so the peak extra memory is one full fp32 weight plus its KPSVD. With
``W`` processes the targets go in groups of ``W``: each process keeps a copy of one weight of the group,
decomposes it while the others decompose theirs, and every decision (rank, evidence, factors) is broadcast
from the process that made it. All processes therefore hold identical ranks and factors, whatever
floating-point noise their own hardware would have produced, and init time falls with the process count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..kron.budget import BudgetItem, allocate_budget, parse_budget
from ..kron.kpsvd import KPSVDResult, kpsvd
from ..kron.rank import RankDecision, energy_kept, select_rank
from ..kron.shapes import KronShape
from .config import SokaConfig
from .distributed import broadcast_object, gathered, process_info
from .selection import lookup_pattern


@dataclass
class ModuleInit:
    """The decision for one module and, unless loading a saved adapter, its top-``rank`` KPSVD (on the CPU)."""

    decision: RankDecision
    factors: KPSVDResult | None


def decide_module(config: SokaConfig, key: str, weight: torch.Tensor, shape: KronShape) -> ModuleInit:
    """KPSVD of one full weight ``(m·p, n·q)`` and the number of terms to keep (a ``rank_pattern`` entry wins)."""
    fixed = lookup_pattern(config.rank_pattern, key)
    window = fixed if fixed is not None else max(config.search_window, config.max_rank)
    result = kpsvd(
        weight,
        shape,
        min(window, shape.max_rank),
        method=config.svd,
        niter=config.svd_niter,
        oversample=config.svd_oversample,
        seed=config.seed,
    )
    if fixed is None:
        decision = select_rank(
            result.S,
            result.total_energy,
            energy_threshold=config.energy_threshold,
            elbow_mode=config.elbow_mode,
            combine=config.rank_combine,
            min_rank=config.min_rank,
            max_rank=config.max_rank,
            search_window=config.search_window,
        )
    else:
        rank = min(int(fixed), result.rank)
        decision = RankDecision(
            rank=rank,
            decided_by="pattern",
            energy_kept=energy_kept(result.S, result.total_energy, rank),
            total_energy=result.total_energy,
            spectrum=[float(v) for v in result.S],
        )
    r = decision.rank
    factors = KPSVDResult(
        A=result.A[:r].cpu(), B=result.B[:r].cpu(), S=result.S[:r].cpu(), total_energy=result.total_energy
    )
    return ModuleInit(decision=decision, factors=factors)


def decide_all(
    config: SokaConfig, targets: list[tuple[str, nn.Linear, KronShape]], desc: str = "SoKA init"
) -> dict[str, ModuleInit]:
    """Decisions for every ``(name, linear, shape)`` target; collective when distributed (see module doc)."""
    if config.resolved:  # loading a saved adapter: ranks are stored, factors come from the checkpoint
        return {
            key: ModuleInit(
                RankDecision(rank=int(lookup_pattern(config.rank_pattern, key)), decided_by="stored"), None
            )
            for key, _, _ in targets
        }
    rank, world = process_info()
    results: dict[str, ModuleInit] = {}
    with tqdm(total=len(targets), desc=desc, unit="module", disable=rank != 0) as progress:
        for start in range(0, len(targets), world):
            group = targets[start : start + world]
            mine: tuple[str, torch.Tensor, KronShape] | None = None
            for offset, (key, linear, shape) in enumerate(group):
                with gathered([linear.weight]):
                    if offset == rank:
                        mine = (key, linear.weight.detach().to(torch.float32, copy=True), shape)
            local = decide_module(config, *mine) if mine is not None else None
            del mine
            for offset, (key, _, _) in enumerate(group):
                results[key] = broadcast_object(local if offset == rank else None, src=offset)
            progress.update(len(group))
    if config.param_budget is not None:
        apply_budget(config, results, targets)
    return results


def apply_budget(
    config: SokaConfig, results: dict[str, ModuleInit], targets: list[tuple[str, nn.Linear, KronShape]]
) -> None:
    """Lower each module's rank (its per-module choice is the cap) so the total fits ``config.param_budget``.

    Runs on identical inputs on every process (decisions were broadcast), so all processes agree.
    """
    budget = parse_budget(config.param_budget)
    sigma_cost = 1 if config.sigma_mode == "separate" else 0
    items = []
    for key, _, shape in targets:
        decision = results[key].decision
        fixed = decision.decided_by == "pattern"
        items.append(
            BudgetItem(
                spectrum=torch.tensor(decision.spectrum, dtype=torch.float64),
                total_energy=decision.total_energy,
                cost=shape.params_per_term + sigma_cost,
                min_rank=decision.rank if fixed else min(config.min_rank, decision.rank),
                cap=decision.rank,
            )
        )
    ranks = allocate_budget(items, budget)
    for (key, _, _), item, rank in zip(targets, items, ranks, strict=True):
        init = results[key]
        if rank == init.decision.rank:
            continue
        init.decision.rank = rank
        init.decision.decided_by = "budget"
        init.decision.energy_kept = energy_kept(item.spectrum, item.total_energy, rank)
        if init.factors is not None:
            f = init.factors
            init.factors = KPSVDResult(A=f.A[:rank], B=f.B[:rank], S=f.S[:rank], total_energy=f.total_energy)
