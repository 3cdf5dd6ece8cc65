"""``SokaConfig``: the PEFT configuration of a SoKA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from ..kron.budget import parse_budget
from ..kron.kpsvd import SVD_METHODS
from ..kron.rank import check_selection_args
from ..kron.shapes import SHAPE_RULES
from .peft_type import SOKA_PEFT_TYPE

INIT_MODES = ("kpsvd", "zero", "gradient")
INIT_SOURCES = ("weight", "gradient")
SIGMA_MODES = ("separate", "sqrt")
FORWARD_MODES = ("factored", "dense")
AUTO_SHAPE = "auto"  # search each module's shape (see axolotl_soka.kron.shape_search)
SHAPE_SPECS = (*SHAPE_RULES, AUTO_SHAPE)


def check_shape_spec(value: Any, key: str) -> None:
    """A factor-shape spec is ``"balanced"``, ``"lora"``, ``"auto"`` or four positive integers ``[m, n, p, q]``."""
    if isinstance(value, str):
        if value not in SHAPE_SPECS:
            raise ValueError(f"{key} {value!r} is unknown; allowed: {', '.join(SHAPE_SPECS)} or [m, n, p, q]")
        return
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(
            f"{key} must be {', '.join(SHAPE_SPECS)} or four positive integers [m, n, p, q], got {value!r}"
        )


@dataclass
class SokaConfig(PeftConfig):
    """Configuration of SoKA: ``ΔW = alpha · Σ_k A_k ⊗ B_k`` per target ``nn.Linear``.

    With ``init="kpsvd"`` the factors start as the top Kronecker components of the pretrained weight and the
    frozen base becomes the residual, so the model is unchanged at step 0. The number of terms per module is
    chosen from the KPSVD spectrum (energy threshold and elbow, clipped to ``[min_rank, max_rank]``); the chosen
    ranks and shapes are written back to ``rank_pattern`` / ``shape_pattern`` (full module names) and saved
    with ``resolved=True``, so loading never selects or decomposes again.
    """

    # ``help`` (and ``default``, words for a default its value does not say) also describe the plugin's
    # ``soka_*`` YAML keys, which are generated from these fields: a field name in backticks is shown there
    # under its YAML key.
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "The `nn.Linear` modules to adapt: names, e.g. [q_proj, k_proj, v_proj, o_proj], or one regex.",
            "default": "every linear layer except the output head",
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave unadapted."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full."}
    )
    energy_threshold: float = field(
        default=0.9,
        metadata={
            "help": "Energy criterion τ in (0, 1]: the fewest Kronecker terms whose σ² hold this share of ‖W‖²_F."
        },
    )
    elbow_mode: str = field(
        default="kneedle",
        metadata={
            "help": "Elbow criterion on the head of the KPSVD spectrum: `kneedle`, `curvature` or `none`."
        },
    )
    rank_combine: str = field(
        default="min",
        metadata={
            "help": "How the energy and elbow ranks combine: `min`, `max`, `energy` or `elbow` (`elbow` needs "
            "`elbow_mode` other than `none`)."
        },
    )
    min_rank: int = field(
        default=1, metadata={"help": "Fewest terms per module (≥ 0; 0 lets a module stay unadapted)."}
    )
    max_rank: int = field(default=8, metadata={"help": "Most terms per module (≥ 1 and ≥ `min_rank`)."})
    search_window: int = field(
        default=64,
        metadata={"help": "Number of leading singular values computed and searched for the elbow (≥ 3)."},
    )
    init: str = field(
        default="kpsvd",
        metadata={
            "help": "`kpsvd`: the factors start as the top Kronecker components of W and the frozen base keeps "
            "the residual, so the model is unchanged at step 0. `gradient`: the factors start as the top "
            "Kronecker components of the calibrated training-loss gradient, scaled by W's own Kronecker singular "
            "values, and the base keeps the residual (unchanged at step 0 too). `zero`: ΔW starts at 0, base "
            "untouched."
        },
    )
    init_source: str | None = field(
        default=None,
        metadata={
            "help": "Whose Kronecker spectrum chooses ranks, budget shares and `auto` shapes: `weight` (W's) or "
            "`gradient` (the training-loss gradient's, summed over calibration batches by "
            "`calibrate_gradients` before the adapter is built).",
            "default": "`gradient` when `init` is `gradient`, else `weight`",
        },
    )
    svd: str = field(
        default="lowrank",
        metadata={
            "help": "`full` (exact SVD) or `lowrank` (seeded randomized SVD) of the rearranged weight."
        },
    )
    svd_niter: int = field(default=8, metadata={"help": "Power iterations of the randomized SVD (≥ 0)."})
    svd_oversample: int = field(default=10, metadata={"help": "Extra columns of the randomized SVD (≥ 0)."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the randomized SVD and of `zero` init factors (≥ 0)."}
    )
    sigma_mode: str = field(
        default="separate",
        metadata={
            "help": "`separate`: unit-norm factors and a trainable σ per term; `sqrt`: √σ folded into A and B."
        },
    )
    alpha: float = field(
        default=1.0, metadata={"help": "Scale of the update, ΔW = alpha · Σ_k A_k ⊗ B_k (non-zero)."}
    )
    factor_shape: str | list[int] = field(
        default="balanced",
        metadata={
            "help": "Factor shapes: A_k is m×n, B_k is p×q with m·p = out, n·q = in. `balanced` minimises "
            "parameters per term (4096×4096 → (64, 64, 64, 64)); `lora` is (out, 1, 1, in), i.e. rank-1 terms; "
            "`auto` searches, per module, the factorization whose affordable terms capture the most energy of "
            "the selection spectrum's matrix for the module's share of `param_budget`; or [m, n, p, q]."
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    chunk_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the factored product (≥ 1). Smaller chunks lower the transient memory "
            "of the product, not the activations kept for backward.",
            "default": "a chunk whose intermediate is 4 MiB on a CPU (cache-sized) and 256 MiB on a GPU",
        },
    )
    forward_mode: str = field(
        default="factored",
        metadata={
            "help": "factored: ΔW is never formed, the product runs as two small matrix products per token; "
            "dense: for calls with enough tokens, W + ΔW is formed transiently and the layer runs as one GEMM "
            "on it (factor gradients stay factored): faster, one weight-sized temporary per layer call."
        },
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Fixed term counts (≥ 0) per module name or regex; no rank selection there."},
    )
    shape_pattern: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Factor shapes (as in `factor_shape`) per module name or regex, overriding it there."
        },
    )
    param_budget: int | str | None = field(
        default=None,
        metadata={
            "help": "Total trainable parameters (e.g. 990000 or '0.99M'), shared among modules greedily by "
            "captured energy per parameter; each module's energy/elbow choice and `max_rank` cap its share."
        },
    )
    resolved: bool = field(
        default=False,
        metadata={
            "help": "Set on save: rank_pattern and shape_pattern hold every module's final rank and shape."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SOKA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values for any bad setting."""
        # as LoRA: a string target (regex, plain name or "all-linear") is matched whole, with no layer index;
        # with the default (None) or a list of names, layers_to_transform selects the layers
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
            )
        check_selection_args(
            self.energy_threshold,
            self.elbow_mode,
            self.rank_combine,
            self.min_rank,
            self.max_rank,
            self.search_window,
        )
        if self.init not in INIT_MODES:
            raise ValueError(f"init {self.init!r} is unknown; allowed: {', '.join(INIT_MODES)}")
        if self.init_source is None:
            self.init_source = "gradient" if self.init == "gradient" else "weight"
        if self.init_source not in INIT_SOURCES:
            raise ValueError(
                f"init_source {self.init_source!r} is unknown; allowed: {', '.join(INIT_SOURCES)}"
            )
        if self.init == "gradient" and self.init_source != "gradient":
            raise ValueError(
                "init 'gradient' takes its factors from the calibrated gradient, so init_source must be "
                f"'gradient' (or unset), got {self.init_source!r}"
            )
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd {self.svd!r} is unknown; allowed: {', '.join(SVD_METHODS)}")
        if self.sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode {self.sigma_mode!r} is unknown; allowed: {', '.join(SIGMA_MODES)}")
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(
                f"forward_mode {self.forward_mode!r} is unknown; allowed: {', '.join(FORWARD_MODES)}"
            )
        for name in ("svd_niter", "svd_oversample", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.chunk_tokens is not None and (
            not isinstance(self.chunk_tokens, int)
            or isinstance(self.chunk_tokens, bool)
            or self.chunk_tokens < 1
        ):
            raise ValueError(f"chunk_tokens must be a positive integer or None, got {self.chunk_tokens!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if float(self.alpha) == 0.0:
            raise ValueError("alpha must be non-zero (it scales the update ΔW = alpha·Σ A_k ⊗ B_k)")
        if self.param_budget is not None:
            parse_budget(self.param_budget)
        check_shape_spec(self.factor_shape, "factor_shape")
        for pattern, spec in self.shape_pattern.items():
            check_shape_spec(spec, f"shape_pattern[{pattern!r}]")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
                raise ValueError(f"rank_pattern[{pattern!r}] must be a non-negative integer, got {rank!r}")
