"""Share a global trainable-parameter budget among modules by captured energy per parameter.

Module ``i`` offers terms ``k = 1..cap_i`` with gains ``g_ik = σ_ik² / ‖W_i‖_F²`` (its energy share, non-increasing
in ``k``) at a cost of ``c_i`` parameters per term. Starting from ``min_rank`` terms everywhere, terms are added
greedily by ``g/c`` while they fit; when the best remaining term does not fit, smaller ones are still tried, so
the leftover is below the cheapest remaining term. Because gains fall within a module, the greedy order is the
optimum of the fractional relaxation, and the integer answer is within one term of it.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_budget(value: int | float | str) -> int:
    """``990000``, ``"0.99M"``, ``"500k"``, ``"1.2e6"`` → a positive integer parameter count."""
    if isinstance(value, bool):
        raise ValueError(f"param_budget must be a positive number such as 990000 or '0.99M', got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgb]?)\s*", str(value).lower())
        if match is None:
            raise ValueError(
                f"param_budget must be a positive number such as 990000 or '0.99M', got {value!r}"
            )
        number = float(match.group(1)) * _SUFFIXES[match.group(2)]
    if number < 1 or number != number:
        raise ValueError(f"param_budget must be at least 1 parameter, got {value!r}")
    return int(round(number))


def check_budget_floor(budget: int, needed: int, modules: int) -> None:
    """Raise ``ValueError`` when the terms every module must keep (``min_rank``, or its fixed rank)
    already cost ``needed > budget`` parameters."""
    if needed > budget:
        raise ValueError(
            f"param_budget {budget:,} is smaller than the {needed:,} parameters that min_rank already needs "
            f"on {modules} modules; raise the budget or lower min_rank (0 lets modules stay unadapted)"
        )


@dataclass
class BudgetItem:
    """One module offered to the allocator.

    Attributes:
        spectrum: ``(K,)`` descending singular values (at least ``cap`` of them).
        total_energy: ``‖W‖_F²``.
        cost: trainable parameters per term (``m·n + p·q``, ``+1`` with a separate σ).
        min_rank: terms the module must keep.
        cap: most terms it may get (``max_rank``, or the energy/elbow choice when those act as caps).
    """

    spectrum: torch.Tensor
    total_energy: float
    cost: int
    min_rank: int
    cap: int


def allocate_budget(items: Sequence[BudgetItem], budget: int) -> list[int]:
    """Terms per module maximising the summed energy share with ``Σ rank_i·cost_i ≤ budget``."""
    ranks = [min(item.min_rank, item.cap) for item in items]
    spent = sum(r * item.cost for r, item in zip(ranks, items, strict=True))
    check_budget_floor(budget, spent, len(items))

    def gain(i: int) -> float:
        item = items[i]
        share = float(item.spectrum[ranks[i]]) ** 2 / item.total_energy if item.total_energy > 0 else 0.0
        return share / item.cost

    heap = [(-gain(i), i) for i, item in enumerate(items) if ranks[i] < min(item.cap, item.spectrum.numel())]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        item = items[i]
        if spent + item.cost > budget:
            continue  # never fits again (spending only grows); cheaper modules may still fit
        ranks[i] += 1
        spent += item.cost
        if ranks[i] < min(item.cap, item.spectrum.numel()):
            heapq.heappush(heap, (-gain(i), i))
    return ranks
