"""Decide every target module's shape, rank and initial factors before any module is replaced.

One pass over the targets, in the same order on every process. On one process each weight is read (gathered
under ZeRO-3) and decomposed in turn, so the peak extra memory is one full fp32 weight plus its KPSVD. With
``W`` processes the targets go in groups of ``W``: each process keeps a copy of one weight of the group,
decomposes it while the others decompose theirs, and every decision (shape, rank, evidence, factors) is
broadcast from the process that made it. All processes therefore hold identical ranks and factors, whatever
floating-point noise their own hardware would have produced, and init time falls with the process count.

The spectrum that chooses ranks (and budget shares and ``auto`` shapes) is the KPSVD of the weight
(``init_source="weight"``) or of the calibrated mean gradient ``Ḡ`` (``"gradient"``; target ``i``'s gradient
is held by process ``i mod W``, the one that decomposes it). The initial factors are the top KPSVD terms of
``W`` (``init="kpsvd"``), or those of ``Ḡ`` scaled by W's own Kronecker singular values
(``init="gradient"``, :func:`gradient_init_coefficients`); either way the residual ``W − Σ c_k A_k ⊗ B_k``
keeps the outputs unchanged at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..kron.budget import BudgetItem, allocate_budget, parse_budget
from ..kron.kpsvd import KPSVDResult, kpsvd, kron_coefficients
from ..kron.rank import RankDecision, energy_kept, select_rank
from ..kron.shape_search import ShapeChoice, search_shape, term_cost
from ..kron.shapes import KronShape, balanced_shape
from .calibration import GradientCalibration
from .config import SokaConfig
from .distributed import all_reduce_values, broadcast_object, gathered, process_info
from .selection import lookup_pattern
from .targets import Target


@dataclass
class ModuleInit:
    """The decision for one module and, unless loading a saved adapter, its initial factors (on the CPU).

    ``factors.S`` holds the coefficients ``c_k`` with ``ΔW_0 = Σ c_k A_k ⊗ B_k``; ``search`` the evaluated
    shapes when the shape was searched (``auto``).
    """

    decision: RankDecision
    factors: KPSVDResult | None
    shape: KronShape
    search: ShapeChoice | None = None


def _sigma_cost(config: SokaConfig) -> int:
    return 1 if config.sigma_mode == "separate" else 0


def _kpsvd(config: SokaConfig, matrix: torch.Tensor, shape: KronShape, k: int) -> KPSVDResult:
    return kpsvd(
        matrix,
        shape,
        min(k, shape.max_rank),
        method=config.svd,
        niter=config.svd_niter,
        oversample=config.svd_oversample,
        seed=config.seed,
    )


def decide_module(
    config: SokaConfig,
    key: str,
    weight: torch.Tensor,
    shape: KronShape | None,
    gradient: torch.Tensor | None = None,
    module_budget: int | None = None,
) -> ModuleInit:
    """Shape (searched when ``None``), rank and initial factors of one module with weight ``(m·p, n·q)``.

    ``gradient`` (same shape as ``weight``) is required with ``init_source="gradient"``; ``module_budget`` (the
    module's share of parameters) with an ``auto`` shape. A ``rank_pattern`` entry fixes the rank.
    """
    source = gradient if config.init_source == "gradient" else weight
    if source is None:
        raise ValueError(f"module {key!r}: init_source='gradient' needs its calibrated gradient")
    search = None
    if shape is None:
        if module_budget is None:
            raise ValueError(f"module {key!r}: an auto factor shape needs the module's parameter budget")
        search = search_shape(
            source,
            module_budget,
            sigma_cost=_sigma_cost(config),
            max_terms=config.max_rank,
            svd=config.svd,
            niter=config.svd_niter,
            oversample=config.svd_oversample,
            seed=config.seed,
            min_terms=max(1, config.min_rank),
            module_name=key,
        )
        shape = search.best.shape
    fixed = lookup_pattern(config.rank_pattern, key)
    window = fixed if fixed is not None else max(config.search_window, config.max_rank)
    result = _kpsvd(config, source, shape, window)
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
    if config.init == "gradient":
        A, B = result.A[:r], result.B[:r]
        S = gradient_init_coefficients(config, weight, shape, A, B)
        factors = KPSVDResult(
            A=A.cpu(), B=B.cpu(), S=S.cpu(), total_energy=float(weight.float().pow(2).sum())
        )
    else:
        if source is not weight and config.init == "kpsvd":
            result = _kpsvd(config, weight, shape, r) if r > 0 else result
        factors = KPSVDResult(
            A=result.A[:r].cpu(), B=result.B[:r].cpu(), S=result.S[:r].cpu(), total_energy=result.total_energy
        )
    return ModuleInit(decision=decision, factors=factors, shape=shape, search=search)


def gradient_init_coefficients(
    config: SokaConfig, weight: torch.Tensor, shape: KronShape, A: torch.Tensor, B: torch.Tensor
) -> torch.Tensor:
    """Coefficients ``c: (r,)`` of the gradient's top terms ``A_k ⊗ B_k`` in ``ΔW_0 = Σ c_k A_k ⊗ B_k``.

    ``|c_k| = σ_k(W)``, the weight's own ``k``-th Kronecker singular value, with the sign of W's projection
    ``⟨W, A_k ⊗ B_k⟩``. The projection itself is usually tiny (the gradient's directions are not W's), and the
    factors' gradients scale with ``c``, so a projection-sized start learns slowly (measured in
    docs/benchmarks.md); any ``c`` keeps the model exact at step 0, since the base keeps ``W − ΔW_0``.
    """
    r = A.shape[0]
    if r == 0:
        return torch.zeros(0)
    projection = kron_coefficients(weight, A, B)
    spectrum = _kpsvd(config, weight, shape, r).S.to(projection)
    sizes = torch.zeros(r, dtype=projection.dtype, device=projection.device)
    sizes[: spectrum.numel()] = spectrum
    sizes = sizes.clamp_min(1e-2 * float(sizes.max().clamp_min(1e-12)))  # never a dead term (sqrt mode)
    return torch.where(projection < 0, -1.0, 1.0).to(projection) * sizes


def module_budgets(config: SokaConfig, targets: list[Target]) -> dict[str, int]:
    """Parameters each ``auto``-shaped module may spend in the shape search.

    With ``param_budget``: the budget split in proportion to ``out + in`` (LoRA's split at equal rank), but at
    least ``max(1, min_rank)`` terms of the cheapest (balanced) shape, so every module has a candidate; the
    global allocation then decides which modules get terms. Without: what ``max_rank`` balanced terms would
    cost.
    """
    cheapest_term = {
        t.name: term_cost(balanced_shape(t.linear.out_features, t.linear.in_features), _sigma_cost(config))
        for t in targets
    }
    if config.param_budget is None:
        return {name: config.max_rank * cost for name, cost in cheapest_term.items()}
    budget = parse_budget(config.param_budget)
    floor_terms = max(1, config.min_rank)
    total = sum(t.linear.out_features + t.linear.in_features for t in targets)
    return {
        t.name: max(
            floor_terms * cheapest_term[t.name],
            int(budget * (t.linear.out_features + t.linear.in_features) / total),
        )
        for t in targets
    }


def _check_calibration(
    config: SokaConfig, calibration: GradientCalibration | None, targets: list[Target]
) -> None:
    if config.init_source != "gradient":
        return
    if calibration is None:
        raise ValueError(
            f"init_source='gradient' (init={config.init!r}) needs the training-loss gradients: call "
            "axolotl_soka.calibrate_gradients(model, config, batches) before get_peft_model(model, config) "
            "(the Axolotl plugin does this with soka_calibration_batches)"
        )
    rank, world = process_info()
    missing = [
        t.name for i, t in enumerate(targets) if i % world == rank and t.name not in calibration.gradients
    ]
    if all_reduce_values([len(missing)], op="max")[0] > 0:  # every process raises, none hangs
        first = f" (first: {missing[0]!r})" if missing else " on another process"
        raise ValueError(
            f"the gradient calibration has no gradient for {len(missing) or 'some'} target modules{first}; "
            "calibrate with the same model and config (target_modules, exclude_modules) as get_peft_model, and "
            "check that every target takes part in the forward pass"
        )


def decide_all(
    config: SokaConfig,
    targets: list[Target],
    calibration: GradientCalibration | None = None,
    desc: str = "SoKA init",
) -> dict[str, ModuleInit]:
    """Decisions for every target; collective when distributed (see module doc)."""
    if config.resolved:  # loading a saved adapter: ranks are stored, factors come from the checkpoint
        out = {}
        for t in targets:
            if t.shape is None:
                raise ValueError(
                    f"the saved SoKA config (resolved=True) has no factor shape for module {t.name!r}"
                )
            rank = RankDecision(rank=int(lookup_pattern(config.rank_pattern, t.name)), decided_by="stored")
            out[t.name] = ModuleInit(rank, None, t.shape)
        return out
    _check_calibration(config, calibration, targets)
    budgets = module_budgets(config, targets) if any(t.shape is None for t in targets) else {}
    rank, world = process_info()
    results: dict[str, ModuleInit] = {}
    with tqdm(total=len(targets), desc=desc, unit="module", disable=rank != 0) as progress:
        for start in range(0, len(targets), world):
            group = targets[start : start + world]
            mine: Target | None = None
            weight: torch.Tensor | None = None
            for offset, target in enumerate(group):
                with gathered([target.linear.weight]):
                    if offset == rank:
                        mine = target
                        weight = target.linear.weight.detach().to(torch.float32, copy=True)
            local = None
            if mine is not None:
                gradient = calibration.gradients.pop(mine.name, None) if calibration is not None else None
                if gradient is not None:
                    gradient = gradient.to(weight.device)  # decompose where the weight lives (GPU if any)
                local = decide_module(config, mine.name, weight, mine.shape, gradient, budgets.get(mine.name))
                del gradient
            del weight
            for offset, target in enumerate(group):
                results[target.name] = broadcast_object(local if offset == rank else None, src=offset)
            progress.update(len(group))
    if config.param_budget is not None:
        apply_budget(config, results, targets)
    return results


def apply_budget(config: SokaConfig, results: dict[str, ModuleInit], targets: list[Target]) -> None:
    """Lower each module's rank (its per-module choice is the cap) so the total fits ``config.param_budget``.

    Runs on identical inputs on every process (decisions were broadcast), so all processes agree.
    """
    budget = parse_budget(config.param_budget)
    items = []
    for t in targets:
        init = results[t.name]
        decision = init.decision
        fixed = decision.decided_by == "pattern"
        items.append(
            BudgetItem(
                spectrum=torch.tensor(decision.spectrum, dtype=torch.float64),
                total_energy=decision.total_energy,
                cost=term_cost(init.shape, _sigma_cost(config)),
                min_rank=decision.rank if fixed else min(config.min_rank, decision.rank),
                cap=decision.rank,
            )
        )
    ranks = allocate_budget(items, budget)
    for t, item, rank in zip(targets, items, ranks, strict=True):
        init = results[t.name]
        if rank == init.decision.rank:
            continue
        init.decision.rank = rank
        init.decision.decided_by = "budget"
        init.decision.energy_kept = energy_kept(item.spectrum, item.total_energy, rank)
        if init.factors is not None:
            f = init.factors
            init.factors = KPSVDResult(A=f.A[:rank], B=f.B[:rank], S=f.S[:rank], total_energy=f.total_energy)
