"""Pure Kronecker math for SoKA: shapes, the rearrangement, KPSVD, factored and dense apply, rank selection.

Plain torch functions; nothing here imports PEFT or Axolotl.
"""

from .apply import contraction_costs, kron_apply, kron_delta
from .budget import BudgetItem, allocate_budget, parse_budget
from .dense_forward import dense_forward_pays, effective_weight, kron_linear
from .dense_forward_op import kron_linear_op  # noqa: F401  (registers the compiled dense forward's operators)
from .kpsvd import SVD_METHODS, KPSVDResult, fix_signs, kpsvd, kron_coefficients, randomized_svd
from .rank import (
    COMBINE_MODES,
    ELBOW_MODES,
    RankDecision,
    check_selection_args,
    elbow_curvature,
    elbow_kneedle,
    energy_kept,
    energy_rank,
    energy_shares,
    select_rank,
)
from .rearrange import rearrange, rearrange_inverse
from .shape_search import ShapeCandidate, ShapeChoice, candidate_shapes, search_shape
from .shapes import SHAPE_RULES, KronShape, balanced_shape, divisors, lora_shape, resolve_shape

__all__ = [
    "COMBINE_MODES",
    "ELBOW_MODES",
    "SHAPE_RULES",
    "SVD_METHODS",
    "BudgetItem",
    "KPSVDResult",
    "KronShape",
    "RankDecision",
    "ShapeCandidate",
    "ShapeChoice",
    "allocate_budget",
    "balanced_shape",
    "candidate_shapes",
    "check_selection_args",
    "contraction_costs",
    "dense_forward_pays",
    "divisors",
    "elbow_curvature",
    "effective_weight",
    "elbow_kneedle",
    "energy_kept",
    "energy_rank",
    "energy_shares",
    "fix_signs",
    "kpsvd",
    "kron_apply",
    "kron_coefficients",
    "kron_delta",
    "kron_linear",
    "lora_shape",
    "parse_budget",
    "randomized_svd",
    "rearrange",
    "rearrange_inverse",
    "resolve_shape",
    "search_shape",
    "select_rank",
]
