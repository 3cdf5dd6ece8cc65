"""The adapters compared, each built at a target trainable-parameter count on the same base model.

A budget tier is LoRA's count at rank ``r`` on q, k, v, o, gate, up and down (tier ``"lora"``), or the count of
one balanced Kronecker term with its σ on each of them (tier ``"kron"``, the paper's regime: about LoKr's
default count). LoRA and PiSSA use the rank whose count is closest (at least 1); LoKr the rank, and
``lokr-factor`` the rank and ``decompose_factor``, whose count is closest; VeRA the rank whose count is
closest; SoKA variants use ``param_budget`` (energy and elbow act as per-module caps), so their count lands
within one Kronecker term per module type of the budget. Below the one-term floor SoKA may leave modules
unadapted (``min_rank=0``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from peft import LoKrConfig, LoraConfig, PeftConfig, PeftModel, VeraConfig, get_peft_model
from torch import nn

import axolotl_soka  # noqa: F401  (registers SoKA with PEFT)
from axolotl_soka import SokaConfig, calibrate_gradients
from axolotl_soka.kron import balanced_shape

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "pissa", "soka", "soka-grad", "lokr", "soka-zero", "soka-lora-shape", "soka-grad-auto")
TIERS = ("lora", "kron")
LR_GRIDS = {
    "lora": (1e-4, 3e-4, 1e-3),
    "pissa": (1e-4, 3e-4, 1e-3),
    "lokr": (1e-3, 3e-3, 1e-2),
    "lokr-factor": (1e-3, 3e-3, 1e-2),
    "vera": (1e-3, 3e-3, 1e-2),
    "soka": (1e-4, 3e-4, 1e-3),
    "soka-zero": (1e-3, 3e-3, 1e-2),
    "soka-lora-shape": (1e-4, 3e-4, 1e-3),
    "soka-grad": (1e-4, 3e-4, 1e-3),  # its terms start at W's Kronecker singular values, as soka's do
}
# methods without a grid of their own take a sibling's chosen rate (less tuning, never more)
LR_FROM = {"soka-grad-auto": "soka-grad"}
# gradient-calibrated methods: training batches (the run's first ones) whose loss gradient is calibrated
CALIBRATION_BATCHES = 8
CALIBRATED = ("soka-grad", "soka-grad-auto")


@dataclass(frozen=True)
class MethodSpec:
    """One adapter at one budget: ``fraction`` of the tier's count (LoRA's at ``lora_rank``, or one Kronecker
    term per module for ``tier="kron"``)."""

    method: str
    lora_rank: int
    fraction: float = 1.0
    tier: str = "lora"

    @property
    def tier_name(self) -> str:
        return "kron" if self.tier == "kron" else f"r{self.lora_rank}"

    @property
    def name(self) -> str:
        suffix = "" if self.fraction == 1.0 else f"@{self.fraction:g}x"
        return f"{self.method}-{self.tier_name}{suffix}"


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_budget(model: nn.Module, rank: int) -> int:
    """LoRA's trainable parameters at ``rank`` on the target projections of ``model``."""
    return sum(rank * (m.in_features + m.out_features) for m in _targets(model))


def _targets(model: nn.Module) -> list[nn.Linear]:
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]


def kron_budget(model: nn.Module) -> int:
    """One balanced Kronecker term per target with its σ: ``Σ (m·n + p·q + 1)``."""
    total = 0
    for m in _targets(model):
        shape = balanced_shape(m.out_features, m.in_features)
        total += shape.m * shape.n + shape.p * shape.q + 1
    return total


def tier_budget(model: nn.Module, spec: MethodSpec) -> int:
    base = kron_budget(model) if spec.tier == "kron" else lora_budget(model, spec.lora_rank)
    return int(round(base * spec.fraction))


def _closest(model: nn.Module, budget: int, configs: list[PeftConfig]) -> PeftConfig:
    """The config among ``configs`` whose trainable count on ``model`` is closest to ``budget``."""
    best = None
    for config in configs:
        gap = abs(trainable(get_peft_model(copy.deepcopy(model), copy.deepcopy(config))) - budget)
        if best is None or gap < best[0]:
            best = (gap, config)
    return best[1]


def _lokr(model: nn.Module, budget: int, factors: tuple[int, ...]) -> LoKrConfig:
    """The LoKr config (rank, and ``decompose_factor`` among ``factors``) whose count is closest to ``budget``."""
    ranks = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    configs = [
        LoKrConfig(r=r, alpha=r, decompose_factor=f, target_modules=TARGETS) for f in factors for r in ranks
    ]
    return _closest(model, budget, configs)


def _vera_rank(model: nn.Module, budget: int) -> int:
    """VeRA trains ``λ_b`` (out) and ``λ_d`` (r) per module: the rank whose count ``Σ out + N·r`` is closest."""
    targets = _targets(model)
    fixed = sum(m.out_features for m in targets)
    return max(1, round((budget - fixed) / len(targets)))


def make_config(model: nn.Module, spec: MethodSpec, seed: int) -> PeftConfig:
    """The PEFT config of ``spec`` for ``model`` (LoKr's rank search happens here, outside any timing)."""
    budget = tier_budget(model, spec)
    per_rank = lora_budget(model, 1)
    r = max(1, round(budget / per_rank)) if spec.tier == "kron" else spec.lora_rank
    soka = dict(
        target_modules=TARGETS,
        param_budget=budget,
        min_rank=0 if budget < kron_budget(model) else 1,
        max_rank=64,
        energy_threshold=0.9,
        elbow_mode="kneedle",
        rank_combine="max",
        seed=seed,
    )
    if spec.method == "lora":
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
    elif spec.method == "pissa":
        config = LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights="pissa_niter_4")
    elif spec.method == "lokr":
        config = _lokr(model, budget, factors=(-1,))
    elif spec.method == "lokr-factor":
        config = _lokr(model, budget, factors=(2, 4, 8, 16, 32, 64))
    elif spec.method == "vera":
        config = VeraConfig(r=_vera_rank(model, budget), target_modules=TARGETS, projection_prng_key=seed)
    elif spec.method == "soka":
        config = SokaConfig(**soka)
    elif spec.method == "soka-zero":
        config = SokaConfig(init="zero", **soka)
    elif spec.method == "soka-lora-shape":
        config = SokaConfig(factor_shape="lora", **soka)
    elif spec.method == "soka-grad":
        config = SokaConfig(init="gradient", **soka)
    elif spec.method == "soka-grad-auto":
        config = SokaConfig(init="gradient", factor_shape="auto", **soka)
    else:
        raise ValueError(f"unknown method {spec.method!r}; allowed: {', '.join(METHODS)}")
    return config


def build(model: nn.Module, config: PeftConfig, calibration: list[dict] | None = None) -> PeftModel:
    """Wrap ``model`` with the adapter (the timed part: gradient calibration on ``calibration`` batches, for
    the methods that need it, and SVD/KPSVD initialisation happen here)."""
    if calibration is not None:
        calibrate_gradients(model, config, calibration, progress=False)
    return get_peft_model(model, config)
