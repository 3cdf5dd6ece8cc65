"""The rank report as plain data: one row per targeted module, totals, and the settings that produced it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

_LAYER_RE = re.compile(r"\.(\d+)\.")
PEFT_PREFIX = "base_model.model."
REPORT_SETTINGS = (
    "energy_threshold",
    "elbow_mode",
    "rank_combine",
    "min_rank",
    "max_rank",
    "search_window",
    "init",
    "svd",
    "sigma_mode",
    "alpha",
    "factor_shape",
)


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """``("model.layers.3.self_attn.q_proj")`` → ``(3, "q_proj")``: the last index in the name and the leaf name."""
    indices = _LAYER_RE.findall(f".{name}.")
    return (int(indices[-1]) if indices else None), name.rsplit(".", 1)[-1]


def build_report(selections: Mapping[str, Any], config: Any = None) -> dict[str, Any]:
    """Report data from ``{module_name: ModuleSelection}`` (``soka_selections[adapter]``) and the ``SokaConfig``.

    Rows keep each module's evidence (energy and elbow ranks, spectrum head); ``totals`` cover every module.
    """
    modules = []
    for name, sel in selections.items():
        row = sel.to_dict()
        layer, kind = layer_and_kind(name)
        row.update(
            layer=layer, kind=kind, adapted=sel.rank > 0, base_params=sel.out_features * sel.in_features
        )
        modules.append(row)
    adapted = [m for m in modules if m["adapted"]]
    ranks = [m["rank"] for m in adapted]
    trainable = sum(m["trainable_params"] for m in modules)
    base = sum(m["base_params"] for m in adapted)
    totals = {
        "modules": len(modules),
        "adapted_modules": len(adapted),
        "total_terms": sum(ranks),
        "mean_rank": (sum(ranks) / len(ranks)) if ranks else 0.0,
        "min_rank": min(ranks, default=0),
        "max_rank": max(ranks, default=0),
        "trainable_params": trainable,
        "base_params_adapted": base,
        "trainable_share": (trainable / base) if base else 0.0,
    }
    settings = {k: getattr(config, k) for k in REPORT_SETTINGS if config is not None and hasattr(config, k)}
    return {"settings": settings, "modules": modules, "totals": totals}


def adapter_stats(model: nn.Module) -> dict[str, Any]:
    """Ranks and parameter counts read from a model's SoKA layers (fresh, loaded or resumed alike).

    ``trainable_params`` counts every parameter with ``requires_grad`` (ZeRO-3 partitioned ones by their full
    size, ``ds_numel``); ``adapter_params`` only the SoKA factors; ``mean_rank/<kind>`` averages per leaf name.
    """
    from ..tuner.layer import SokaLayer

    ranks: dict[str, int] = {}
    adapter_params = 0
    for name, module in model.named_modules():
        if not isinstance(module, SokaLayer):
            continue
        for adapter, rank in module.r.items():
            shape = module.kshape[adapter]
            ranks[name.removeprefix(PEFT_PREFIX)] = rank
            adapter_params += rank * shape.params_per_term + (rank if adapter in module.soka_s else 0)
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)
    stats: dict[str, Any] = {
        "adapted_modules": len(ranks),
        "total_terms": sum(ranks.values()),
        "mean_rank": (sum(ranks.values()) / len(ranks)) if ranks else 0.0,
        "trainable_params": trainable,
        "adapter_params": adapter_params,
    }
    by_kind: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        by_kind.setdefault(layer_and_kind(name)[1], []).append(rank)
    for kind, values in sorted(by_kind.items()):
        stats[f"mean_rank/{kind}"] = sum(values) / len(values)
    return stats
