"""YAML keys of the SoKA plugin (``soka_*``), merged into Axolotl's config schema.

Every key maps onto a field of :class:`axolotl_soka.SokaConfig`; the rules live there and are reused here: a
``model_validator`` builds a ``SokaConfig`` from the keys and re-raises its ``ValueError`` under the ``soka_*``
key name, so a bad value fails at config validation, before any model is loaded.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

from ..prompts import TASKS
from .extras import missing_extra

try:
    from pydantic import BaseModel, Field, model_validator
except ImportError as exc:  # pydantic comes with axolotl, not with the core package
    raise missing_extra(exc, "pydantic") from exc

ADAPTER_NAME = "soka"

# YAML key -> SokaConfig field
KEY_TO_FIELD: dict[str, str] = {
    "soka_energy_threshold": "energy_threshold",
    "soka_elbow_mode": "elbow_mode",
    "soka_rank_combine": "rank_combine",
    "soka_min_rank": "min_rank",
    "soka_max_rank": "max_rank",
    "soka_search_window": "search_window",
    "soka_alpha": "alpha",
    "soka_init": "init",
    "soka_svd": "svd",
    "soka_svd_niter": "svd_niter",
    "soka_svd_oversample": "svd_oversample",
    "soka_seed": "seed",
    "soka_sigma_mode": "sigma_mode",
    "soka_factor_shape": "factor_shape",
    "soka_dropout": "dropout",
    "soka_chunk_tokens": "chunk_tokens",
    "soka_forward_mode": "forward_mode",
    "soka_rank_pattern": "rank_pattern",
    "soka_shape_pattern": "shape_pattern",
    "soka_exclude_modules": "exclude_modules",
    "soka_param_budget": "param_budget",
    "soka_init_source": "init_source",
}
# SoKA key -> Axolotl key whose value (as written in the config) it takes when unset
AXOLOTL_FALLBACK: dict[str, str] = {"soka_seed": "seed"}
FIELD_TO_KEY = {field: key for key, field in KEY_TO_FIELD.items()}
_FIELD_RE = re.compile(
    r"(?<![\w.\-])(" + "|".join(sorted(FIELD_TO_KEY, key=len, reverse=True)) + r")(?![\w\-])"
)


def rename_fields(message: str) -> str:
    """Replace ``SokaConfig`` field names in a core error message by their ``soka_*`` YAML keys."""
    return _FIELD_RE.sub(lambda m: FIELD_TO_KEY[m.group(1)], message)


def _core_config(kwargs: dict[str, Any]) -> Any:
    from ..tuner.config import SokaConfig

    return SokaConfig(**kwargs)


def check_soka_keys(data: dict[str, Any]) -> None:
    """Validate the ``soka_*`` keys of a raw config with the core rules; raise ``ValueError`` naming the key.

    Each key is first checked on its own (so the message names exactly that key and its value), then all of
    them together (cross-key rules such as ``soka_min_rank <= soka_max_rank``).
    """
    given = {key: data[key] for key in KEY_TO_FIELD if data.get(key) is not None}
    for key, value in given.items():
        try:
            _core_config({KEY_TO_FIELD[key]: value})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{key}={value!r} is invalid: {rename_fields(str(exc))}") from None
    try:
        _core_config({KEY_TO_FIELD[key]: value for key, value in given.items()})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid SoKA settings: {rename_fields(str(exc))}") from None
    targets = data.get("soka_target_modules")
    if targets is not None and not (
        isinstance(targets, str)
        or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))
    ):
        raise ValueError(
            f"soka_target_modules={targets!r} is invalid: allowed: a non-empty list of module names "
            "(e.g. [q_proj, v_proj]) or one regex string"
        )
    task = data.get("soka_eval_task")
    if task is not None and task not in TASKS:
        raise ValueError(f"soka_eval_task={task!r} is unknown; allowed: {', '.join(TASKS)}")
    if task == "mbpp":
        from ..eval.sandbox import BWRAP, isolation_error

        # checked here, before the model loads, not at the first evaluation hours into training
        if problem := isolation_error(BWRAP):
            raise ValueError(f"soka_eval_task='mbpp' runs generated programs: {problem}")
    for key in (
        "soka_eval_samples",
        "soka_eval_steps",
        "soka_eval_max_new_tokens",
        "soka_calibration_batches",
    ):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key}={value!r} is invalid: allowed: a positive integer")
    if task is not None and (
        _zero_stage(data.get("deepspeed")) == 3 or data.get("fsdp") or data.get("fsdp_config")
    ):
        raise ValueError(
            f"soka_eval_task={task!r} generates on the main process and cannot run on a sharded model (DeepSpeed "
            "ZeRO-3 or FSDP); allowed there: leave soka_eval_task unset and evaluate the saved adapter with "
            "python -m axolotl_soka.eval"
        )


def apply_axolotl_fallbacks(data: dict[str, Any]) -> None:
    """Give each unset SoKA key in ``AXOLOTL_FALLBACK`` the value of its Axolotl key, e.g. ``soka_seed`` from
    ``seed``. Runs on the raw config: Axolotl's validation later fills an unset ``seed`` with 42, which must not
    count as set (neither key set: ``SokaConfig``'s default 0)."""
    for key, source in AXOLOTL_FALLBACK.items():
        value = data.get(source)
        if data.get(key) is not None or value is None:
            continue
        try:
            _core_config({KEY_TO_FIELD[key]: value})
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{source}={value!r} is invalid as the default of {key}: {rename_fields(str(exc))}; "
                f"set {key} explicitly"
            ) from None
        data[key] = value


def _zero_stage(deepspeed: Any) -> int | None:
    """ZeRO stage of a ``deepspeed:`` setting (a dict or a JSON file path); ``None`` when unknown."""
    if isinstance(deepspeed, str) and Path(deepspeed).is_file():
        try:
            deepspeed = json.loads(Path(deepspeed).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    if isinstance(deepspeed, dict):
        stage = (deepspeed.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, int) else None
    return None


def check_axolotl_keys(data: dict[str, Any]) -> None:
    """Reject Axolotl settings that cannot work with ``adapter: soka``; default ``merge_method`` to ``legacy``."""
    for key in ("load_in_4bit", "load_in_8bit", "gptq"):
        if data.get(key):
            raise ValueError(
                f"{key}: true is not supported with adapter: soka (SoKA initialises from full-precision "
                f"weights); allowed: {key}: false"
            )
    if data.get("fsdp") or data.get("fsdp_config"):
        raise ValueError(
            "fsdp / fsdp_config is not supported with adapter: soka yet (the SoKA initialisation writes a "
            "residual into base weights that FSDP shards, and this path is untested); allowed: DeepSpeed "
            "ZeRO-3, e.g. deepspeed: example_configs/deepspeed/zero3_bf16.json"
        )
    method = data.get("merge_method")
    if method is None:
        data["merge_method"] = "legacy"
    elif method != "legacy":
        raise ValueError(
            f"merge_method={method!r} cannot merge a SoKA adapter (the memory-efficient merge only reads LoRA "
            "adapters); allowed with adapter: soka: legacy"
        )


class SokaArgs(BaseModel):
    """Input arguments of the SoKA plugin (active with ``adapter: soka``)."""

    soka_target_modules: list[str] | str | None = Field(
        default=None,
        description="Linear modules to adapt: names ([q_proj, v_proj]) or one regex. Default: "
        "lora_target_modules when set, else every linear layer of the decoder (not lm_head).",
    )
    soka_exclude_modules: list[str] | str | None = Field(
        default=None, description="Module names or a regex to leave unadapted."
    )
    soka_energy_threshold: float = Field(
        default=0.9,
        description="τ in (0, 1]: the energy criterion keeps the fewest Kronecker terms holding this share "
        "of ‖W‖_F².",
    )
    soka_elbow_mode: str = Field(
        default="kneedle", description="Elbow criterion on the KPSVD spectrum: kneedle, curvature or none."
    )
    soka_rank_combine: str = Field(
        default="min", description="How energy and elbow ranks combine: min, max, energy or elbow."
    )
    soka_min_rank: int = Field(
        default=1, description="Fewest terms per module (0 lets a module stay unadapted)."
    )
    soka_max_rank: int = Field(default=8, description="Most terms per module (at least 1).")
    soka_search_window: int = Field(
        default=64, description="Head K of the spectrum computed and searched for the elbow (at least 3)."
    )
    soka_alpha: float = Field(
        default=1.0, description="Scale of the update ΔW = alpha·Σ A_k ⊗ B_k (non-zero)."
    )
    soka_init: str = Field(
        default="kpsvd",
        description="kpsvd: principal Kronecker components of W, base becomes the residual; gradient: principal "
        "components of the calibrated training-loss gradient, scaled by W's Kronecker singular values, base becomes "
        "the residual; zero: ΔW starts at 0.",
    )
    soka_init_source: str | None = Field(
        default=None,
        description="Spectrum that chooses ranks, budget shares and auto shapes: weight or gradient (the "
        "training-loss gradient over soka_calibration_batches batches). Default: gradient with soka_init: "
        "gradient, else weight.",
    )
    soka_calibration_batches: int = Field(
        default=8,
        description="Training batches (of micro_batch_size rows, all processes together) whose loss gradient "
        "calibrates the spectra with soka_init_source: gradient (>= 1).",
    )
    soka_svd: str = Field(default="lowrank", description="full SVD or lowrank (seeded randomized SVD).")
    soka_svd_niter: int = Field(default=8, description="Power iterations of the randomized SVD (>= 0).")
    soka_svd_oversample: int = Field(default=10, description="Extra columns of the randomized SVD (>= 0).")
    soka_seed: int | None = Field(
        default=None,
        description="Seed of the randomized SVD and of zero-init factors (>= 0). Default: the config's seed "
        "when set, else 0.",
    )
    soka_sigma_mode: str = Field(
        default="separate",
        description="separate: unit-norm factors and a trainable σ per term; sqrt: √σ folded into A and B.",
    )
    soka_factor_shape: str | list[int] = Field(
        default="balanced",
        description="Factor shape: balanced (fewest parameters per term), lora ((out,1,1,in): rank-1 terms), "
        "auto (per module, the shape capturing the most energy of the selection spectrum's matrix for the "
        "module's share of soka_param_budget), or [m, n, p, q] with m·p = out and n·q = in.",
    )
    soka_dropout: float = Field(default=0.0, description="Dropout on the adapter input, in [0, 1).")
    soka_chunk_tokens: int | None = Field(
        default=None,
        description="Tokens per chunk of the factored product (unset: a cache-sized chunk on a CPU, a 256 MiB "
        "intermediate on a GPU). Smaller chunks lower the transient memory, not the saved activations.",
    )
    soka_forward_mode: str = Field(
        default="factored",
        description="factored: ΔW is never formed; dense: for calls with enough tokens (training batches), the "
        "layer runs as one GEMM on W + ΔW formed transiently, factor gradients factored. dense is faster, costs "
        "one weight-sized temporary per layer call, and applies without dropout and without module hooks "
        "(not under DeepSpeed ZeRO-3, which keeps factored).",
    )
    soka_rank_pattern: dict[str, int] | None = Field(
        default=None, description="Fixed term counts per module name or regex (skips rank selection there)."
    )
    soka_shape_pattern: dict[str, str | list[int]] | None = Field(
        default=None, description="Factor shapes per module name or regex (overrides soka_factor_shape)."
    )
    soka_param_budget: int | str | None = Field(
        default=None,
        description="Total trainable parameters (e.g. 990000 or '0.99M') shared among modules by captured energy "
        "per parameter; each module's own choice and soka_max_rank act as caps.",
    )
    soka_report: bool = Field(
        default=True,
        description="Print the rank report and write soka_rank_report.json/.png to output_dir after init.",
    )
    soka_eval_task: str | None = Field(
        default=None,
        description="gsm8k, math or mbpp: greedy-generate on held-out problems and log eval_<task>_accuracy at "
        "each evaluation and at the end of training (single device or DDP; not ZeRO-3/FSDP).",
    )
    soka_eval_data: str | None = Field(
        default=None,
        description="Held-out records for soka_eval_task: a .jsonl/.json file or a Hub dataset name. Default: "
        "the shipped test set (MBPP: its validation tasks 511-600).",
    )
    soka_eval_samples: int | None = Field(
        default=None, description="Problems scored per evaluation with soka_eval_task (default 32)."
    )
    soka_eval_steps: int | None = Field(
        default=None, description="Also score every this many optimizer steps (default: only at evaluations)."
    )
    soka_eval_max_new_tokens: int | None = Field(
        default=None, description="Generation budget per problem for soka_eval_task (default 256)."
    )

    @model_validator(mode="before")
    @classmethod
    def check_soka(cls, data: Any) -> Any:
        """Core validation of the ``soka_*`` keys, only when ``adapter: soka``."""
        if not isinstance(data, dict) or data.get("adapter") != ADAPTER_NAME:
            return data
        check_soka_keys(data)
        apply_axolotl_fallbacks(data)
        check_axolotl_keys(data)
        return data


PREFIX = "soka_"  # of every YAML key the plugin defines

# LoRA keys that ``adapter: soka`` would silently ignore -> the SoKA key(s) to use instead. The LoRA keys the
# plugin honours (lora_target_modules, lora_target_linear, lora_modules_to_save, lora_model_dir) stay allowed.
LORA_REPLACEMENTS: dict[str, tuple[str, ...]] = {
    "lora_r": ("soka_max_rank", "soka_param_budget"),
    "lora_alpha": ("soka_alpha",),
    "lora_dropout": ("soka_dropout",),
}


def soka_keys() -> list[str]:
    """The ``soka_*`` YAML keys the plugin defines: the fields of ``SokaArgs``."""
    return list(SokaArgs.model_fields)


def written_soka_keys(cfg: Any) -> list[str]:
    """The ``soka_*`` keys of a raw config that have a value."""
    return [key for key in cfg if isinstance(key, str) and key.startswith(PREFIX) and cfg[key] is not None]


def check_written_keys(cfg: Any) -> None:
    """Reject, in a raw ``adapter: soka`` config, unknown ``soka_*`` keys (typos) and the LoRA keys in
    ``LORA_REPLACEMENTS``; raise ``ValueError`` naming the key, its value and what to use instead."""
    known = soka_keys()
    unknown = []
    for key in cfg:
        if isinstance(key, str) and key.startswith(PREFIX) and key not in known:
            # Compared without the shared prefix, which would make any soka_* name look close to every key.
            close = difflib.get_close_matches(key[len(PREFIX) :], [k[len(PREFIX) :] for k in known], n=1)
            hint = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
            unknown.append(f"unknown key {key}={cfg[key]!r}{hint}")
    if unknown:
        raise ValueError("; ".join(unknown) + "; the SoKA keys are listed in docs/plugin.md")
    for key, replacements in LORA_REPLACEMENTS.items():
        value = cfg.get(key)
        if value is not None:
            raise ValueError(
                f"{key}={value!r} is ignored with adapter: soka (it configures LoRA); use "
                f"{' or '.join(replacements)} instead, and remove {key} from the config"
            )
