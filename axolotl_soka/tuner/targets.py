"""Find and check the modules a SoKA config adapts, before any weight changes.

Shared by injection (``SokaModel``) and gradient calibration (``calibrate_gradients``), so both see the same
modules in the same order. A module whose shape is ``"auto"`` gets ``shape=None`` here; the initializer searches
its shape later.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule, _maybe_include_all_linear_layers
from torch import nn

from ..kron.shapes import KronShape, resolve_shape
from .config import AUTO_SHAPE, SokaConfig
from .layer import SokaLayer
from .selection import lookup_pattern

QUANTIZED_MODULE_HINTS = (
    "bitsandbytes",
    "bnb",
    "gptq",
    "awq",
    "hqq",
    "quanto",
    "torchao",
    "eetq",
    "aqlm",
    "fp8",
)


class NoTargetError(ValueError):
    """``target_modules`` matched no module of the model."""


@dataclass
class Target:
    """One module to adapt: its full name, its base ``nn.Linear`` and its factor shape (``None``: auto)."""

    name: str
    linear: nn.Linear
    shape: KronShape | None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot carry a SoKA adapter, or ``None`` when it can."""
    cls = type(module)
    qualname = f"{cls.__module__}.{cls.__name__}"
    if isinstance(module, SokaLayer):
        return None
    if any(h in qualname.lower() for h in QUANTIZED_MODULE_HINTS) or (
        isinstance(module, nn.Linear) and not module.weight.is_floating_point()
    ):
        return (
            f"is a quantised layer ({qualname}): not supported yet by SoKA; initialise SoKA on the "
            "full-precision model instead"
        )
    if not isinstance(module, nn.Linear):
        return f"is a {qualname}, not an nn.Linear; SoKA adapts linear layers only"
    return None


def default_targets(config: SokaConfig) -> SokaConfig:
    """``target_modules=None`` means PEFT's ``all-linear`` (every linear layer but the output head)."""
    if config.target_modules is None:
        config.target_modules = "all-linear"
    return config


def _in_layers(config: SokaConfig, keys: set[str]) -> set[str]:
    """The modules of ``keys`` (full names) in ``config.layers_to_transform``, by PEFT's own layer-index rule:
    PEFT skips that rule for full names, so it is asked with each module's last name part instead."""
    by_leaf = copy.copy(config)
    by_leaf.target_modules = {key.rsplit(".", 1)[-1] for key in keys}
    return {key for key in keys if BaseTuner._check_target_module_exists(by_leaf, key)}


def find_targets(model: nn.Module, config: SokaConfig) -> list[Target]:
    """Every module ``config`` targets, in ``named_modules`` order, each checked (type, shape, second adapter).

    ``target_modules=None`` means every linear layer except the output head (PEFT's ``all-linear``). Raises
    ``ValueError`` naming the module for anything that cannot be adapted, and when nothing matches.
    """
    default = config.target_modules is None
    config = _maybe_include_all_linear_layers(default_targets(config), model)
    if default and config.layers_to_transform is not None:
        # the expansion lists full names, which PEFT's matching takes without a layer check: filter here
        config.target_modules = _in_layers(config, set(config.target_modules))
    targets: list[Target] = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(t.name + ".") for t in targets):
            continue
        matched = BaseTuner._check_target_module_exists(config, key)
        if not matched or isinstance(matched, _ExcludedModule):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"target module {key!r} {reason}")
        if config.init != "zero" and isinstance(module, SokaLayer) and any(module.soka_residual.values()):
            raise ValueError(
                f"module {key!r} already holds a residual-based SoKA adapter (init kpsvd or gradient: the base "
                f"weight now carries W minus its initial factors); a second {config.init} adapter would take its "
                "components from that residual. Add further adapters "
                "with init='zero', or export trained adapters with axolotl_soka.export_delta_adapter (they "
                "then load side by side on the original model)"
            )
        base = module.get_base_layer() if isinstance(module, SokaLayer) else module
        spec = lookup_pattern(config.shape_pattern, key)
        spec = spec if spec is not None else config.factor_shape
        shape = None if spec == AUTO_SHAPE else resolve_shape(spec, base.out_features, base.in_features, key)
        if config.resolved and lookup_pattern(config.rank_pattern, key) is None:
            raise ValueError(
                f"the saved SoKA config (resolved=True) has no rank for module {key!r}; it does not belong to "
                "this model"
            )
        targets.append(Target(key, base, shape))
    if not targets:
        examples = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
        raise NoTargetError(
            f"target_modules {config.target_modules!r} matched no module of the model; its linear layers are "
            f"named like {examples}"
        )
    return targets
