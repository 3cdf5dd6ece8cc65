"""The adapters compared, each built at a target trainable-parameter count on the same base model.

Budgets are LoRA's count at rank ``r`` on q, k, v, o, gate, up and down. LoRA and PiSSA use that rank; LoKr
uses the rank whose count is closest; SoKA variants use ``param_budget`` (energy and elbow act as
per-module caps), so their count lands within one Kronecker term per module type of the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from peft import LoKrConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

import axolotl_soka  # noqa: F401  (registers SoKA with PEFT)
from axolotl_soka import SokaConfig, calibrate_gradients

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "pissa", "soka", "soka-grad", "lokr", "soka-zero", "soka-lora-shape", "soka-grad-auto")
LR_GRIDS = {
    "lora": (1e-4, 3e-4, 1e-3),
    "pissa": (1e-4, 3e-4, 1e-3),
    "lokr": (1e-3, 3e-3, 1e-2),
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
    """One adapter at one budget: ``fraction`` of LoRA's parameter count at ``lora_rank``."""

    method: str
    lora_rank: int
    fraction: float = 1.0

    @property
    def name(self) -> str:
        suffix = "" if self.fraction == 1.0 else f"@{self.fraction:g}x"
        return f"{self.method}-r{self.lora_rank}{suffix}"


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_budget(model: nn.Module, rank: int) -> int:
    """LoRA's trainable parameters at ``rank`` on the target projections of ``model``."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    )


def _lokr_rank(model: nn.Module, budget: int) -> int:
    """The LoKr rank whose parameter count is closest to ``budget``."""
    best = None
    for rank in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
        probe = get_peft_model(copy.deepcopy(model), LoKrConfig(r=rank, alpha=rank, target_modules=TARGETS))
        gap = abs(trainable(probe) - budget)
        if best is None or gap < best[0]:
            best = (gap, rank)
    return best[1]


def make_config(model: nn.Module, spec: MethodSpec, seed: int) -> PeftConfig:
    """The PEFT config of ``spec`` for ``model`` (LoKr's rank search happens here, outside any timing)."""
    budget = int(round(lora_budget(model, spec.lora_rank) * spec.fraction))
    r = spec.lora_rank
    soka = dict(
        target_modules=TARGETS,
        param_budget=budget,
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
        rank = _lokr_rank(model, budget)
        config = LoKrConfig(r=rank, alpha=rank, target_modules=TARGETS)
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
