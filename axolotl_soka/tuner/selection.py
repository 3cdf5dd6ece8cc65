"""Per-module decisions recorded during initialisation (shape, rank, evidence), for reports and configs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..kron.rank import RankDecision
from ..kron.shapes import KronShape

T = TypeVar("T")


@dataclass
class ModuleSelection:
    """What SoKA chose for one module: ``(out, in)`` weight, factor shape, rank and the rank's evidence.

    ``source`` says whose spectrum chose the rank (``weight``, ``gradient`` or ``stored`` when loaded);
    ``shape_candidates`` lists the best shapes of an ``auto`` shape search (``None`` without one).
    """

    name: str
    out_features: int
    in_features: int
    shape: KronShape
    decision: RankDecision
    sigma_mode: str
    source: str = "weight"
    shape_candidates: list[dict[str, Any]] | None = None

    @property
    def rank(self) -> int:
        return self.decision.rank

    @property
    def trainable_params(self) -> int:
        """``r·(m·n + p·q)``, plus ``r`` for a separate σ per term."""
        extra = self.rank if self.sigma_mode == "separate" else 0
        return self.rank * self.shape.params_per_term + extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.name,
            "out_features": self.out_features,
            "in_features": self.in_features,
            "shape": self.shape.as_list(),
            "rank": self.rank,
            "trainable_params": self.trainable_params,
            "source": self.source,
            "shape_candidates": self.shape_candidates,
            **{k: v for k, v in self.decision.to_dict().items() if k != "rank"},
        }


def pattern_matches(pattern: str, key: str) -> bool:
    """Whether a ``rank_pattern``/``shape_pattern`` key applies to module ``key``: its full name, or a regex
    matching as PEFT does (``(.*\\.)?pattern$``)."""
    return pattern == key or re.match(rf"(.*\.)?({pattern})$", key) is not None


def pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """The entry of ``patterns`` that applies to module ``key``: an exact full-name entry first, else the
    first matching pattern; ``None`` when none applies."""
    if key in patterns:
        return key
    return next((pattern for pattern in patterns if pattern_matches(pattern, key)), None)


def lookup_pattern(patterns: Mapping[str, T], key: str) -> T | None:
    """Value for module ``key`` (see :func:`pattern_key`); ``None`` when nothing matches."""
    found = pattern_key(patterns, key)
    return patterns[found] if found is not None else None
