"""Choose how many Kronecker terms to keep from a singular-value spectrum.

Two criteria on ``σ_1 ≥ σ_2 ≥ …`` (the head of the spectrum of ``R(W)``), with the total energy ``‖W‖_F²``
passed separately so that a truncated SVD suffices:

- energy: the smallest ``r`` with ``Σ_{k≤r} σ_k² / ‖W‖_F² ≥ τ``;
- elbow, over the first ``K`` values (the search window): ``kneedle``, the point farthest below the chord
  from ``(1, σ_1)`` to ``(K, σ_K)`` in coordinates normalised to ``[0, 1]``; or ``curvature``, the largest
  discrete second difference ``σ_{k−1} − 2σ_k + σ_{k+1}``. Both return the number of terms *before* the
  elbow point (for ``[10, 10, 10, 0.1, 0.1, …]`` that is 3).

They are combined (``min``, ``max``, ``energy`` alone or ``elbow`` alone) and clipped to
``[min_rank, max_rank]``. Every decision carries its evidence for reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

ELBOW_MODES = ("kneedle", "curvature", "none")
COMBINE_MODES = ("min", "max", "energy", "elbow")


@dataclass
class RankDecision:
    """The chosen number of terms for one module and why.

    ``decided_by`` is one of ``energy``, ``elbow``, ``min_rank``, ``max_rank``, ``spectrum`` (fewer terms exist
    than asked for), ``pattern`` (fixed by the user's ``rank_pattern``) or ``budget``.
    """

    rank: int
    decided_by: str
    energy_rank: int | None = None
    elbow_rank: int | None = None
    energy_kept: float = 0.0
    total_energy: float = 0.0
    spectrum: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def energy_shares(S: torch.Tensor, total_energy: float) -> torch.Tensor:
    """Cumulative energy share of the top ``r`` terms, ``r = 1..len(S)``: ``(K,)``."""
    if total_energy <= 0:
        return torch.ones_like(S, dtype=torch.float64)
    return torch.cumsum(S.double().pow(2), 0) / total_energy


def energy_kept(S: torch.Tensor, total_energy: float, rank: int) -> float:
    """Share of ``‖W‖_F²`` held by the top ``rank`` terms of ``S: (K,)`` (0 for rank 0)."""
    return float(energy_shares(S, total_energy)[rank - 1]) if rank > 0 else 0.0


def energy_rank(S: torch.Tensor, total_energy: float, threshold: float) -> int | None:
    """Smallest ``r`` whose top-``r`` energy share is ``≥ threshold``; ``None`` when it lies beyond ``len(S)``."""
    shares = energy_shares(S, total_energy)
    hits = torch.nonzero(shares >= threshold - 1e-12)
    return int(hits[0]) + 1 if hits.numel() else None


def elbow_kneedle(S: torch.Tensor, window: int) -> int:
    """Terms before the point farthest below the chord of the first ``window`` values (Kneedle, Satopää 2011).

    In coordinates normalised to ``[0, 1]`` the chord of a decreasing curve is ``y = 1 − x``, so the
    perpendicular distance is proportional to ``1 − x_k − y_k``. A curve with no point below its chord (linear
    or concave) has no elbow: the whole window is returned.
    """
    y = S[:window].double()
    K = y.numel()
    if K < 3 or float(y[0] - y[-1]) <= 0:
        return K
    x = torch.arange(K, dtype=torch.float64) / (K - 1)
    yn = (y - y[-1]) / (y[0] - y[-1])
    gap = 1.0 - x - yn
    best = int(torch.argmax(gap))
    return best if float(gap[best]) > 1e-12 and best > 0 else K


def elbow_curvature(S: torch.Tensor, window: int) -> int:
    """Terms before the point of largest discrete second difference ``σ_{k−1} − 2σ_k + σ_{k+1}``."""
    y = S[:window].double()
    K = y.numel()
    if K < 3:
        return K
    second = y[:-2] - 2 * y[1:-1] + y[2:]  # index i ↔ point k = i + 1 (0-based)
    best = int(torch.argmax(second))
    return best + 1 if float(second[best]) > 1e-12 else K


def elbow_rank(S: torch.Tensor, mode: str, window: int) -> int | None:
    """Dispatch on ``mode`` (``kneedle``, ``curvature`` or ``none`` → ``None``)."""
    if mode == "kneedle":
        return elbow_kneedle(S, window)
    if mode == "curvature":
        return elbow_curvature(S, window)
    if mode == "none":
        return None
    raise ValueError(f"elbow mode {mode!r} is unknown; allowed: {', '.join(ELBOW_MODES)}")


def check_selection_args(
    energy_threshold: float, elbow_mode: str, combine: str, min_rank: int, max_rank: int, search_window: int
) -> None:
    """Raise ``ValueError`` naming the argument and the allowed values for any bad selection setting."""
    if not (0.0 < float(energy_threshold) <= 1.0):
        raise ValueError(f"energy_threshold must be in (0, 1], got {energy_threshold!r}")
    if elbow_mode not in ELBOW_MODES:
        raise ValueError(f"elbow_mode {elbow_mode!r} is unknown; allowed: {', '.join(ELBOW_MODES)}")
    if combine not in COMBINE_MODES:
        raise ValueError(f"rank_combine {combine!r} is unknown; allowed: {', '.join(COMBINE_MODES)}")
    if combine == "elbow" and elbow_mode == "none":
        raise ValueError("rank_combine 'elbow' needs an elbow_mode; allowed: kneedle, curvature")
    for name, value in (("min_rank", min_rank), ("max_rank", max_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    if min_rank > max_rank:
        raise ValueError(f"min_rank ({min_rank}) must not exceed max_rank ({max_rank})")
    if not isinstance(search_window, int) or isinstance(search_window, bool) or search_window < 3:
        raise ValueError(f"search_window must be an integer of at least 3, got {search_window!r}")


def select_rank(
    S: torch.Tensor,
    total_energy: float,
    *,
    energy_threshold: float = 0.9,
    elbow_mode: str = "kneedle",
    combine: str = "min",
    min_rank: int = 1,
    max_rank: int = 8,
    search_window: int = 64,
) -> RankDecision:
    """Pick the number of terms from the spectrum head ``S: (K,)`` (descending) and ``‖W‖_F²``."""
    check_selection_args(energy_threshold, elbow_mode, combine, min_rank, max_rank, search_window)
    r_energy = energy_rank(S, total_energy, energy_threshold)
    r_elbow = elbow_rank(S, elbow_mode, search_window)
    beyond = S.numel() + 1  # an energy rank past the computed head: more terms than were computed
    candidates = {"energy": r_energy if r_energy is not None else beyond}
    if r_elbow is not None:
        candidates["elbow"] = r_elbow
    if combine == "energy":
        decided_by, rank = "energy", candidates["energy"]
    elif combine == "elbow":
        decided_by, rank = "elbow", candidates["elbow"]
    else:
        # ties are credited to the energy criterion in both modes
        if combine == "min":
            decided_by = min(candidates, key=lambda k: (candidates[k], k != "energy"))
        else:
            decided_by = max(candidates, key=lambda k: (candidates[k], k == "energy"))
        rank = candidates[decided_by]
    if rank > max_rank:
        decided_by, rank = "max_rank", max_rank
    if rank < min_rank:
        decided_by, rank = "min_rank", min_rank
    if rank > S.numel():
        decided_by, rank = "spectrum", int(S.numel())
    return RankDecision(
        rank=int(rank),
        decided_by=decided_by,
        energy_rank=r_energy,
        elbow_rank=r_elbow,
        energy_kept=energy_kept(S, total_energy, rank),
        total_energy=float(total_energy),
        spectrum=[float(v) for v in S[: max(search_window, rank)]],
    )
