"""``SokaModel``: injects SoKA layers into a model (PEFT ``BaseTuner``)."""

from __future__ import annotations

import zlib
from typing import Any

from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule, _maybe_include_all_linear_layers
from torch import nn

from ..kron.shapes import KronShape, resolve_shape
from .config import SokaConfig
from .initializer import decide_all
from .layer import SokaLayer, SokaLinear
from .selection import ModuleSelection, lookup_pattern

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


def _unsupported_reason(module: nn.Module) -> str | None:
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


class SokaModel(BaseTuner):
    """Creates SoKA adapters on the target linear layers.

    After injection, ``soka_selections[adapter_name]`` maps each targeted module name to its
    :class:`ModuleSelection` (shape, rank, evidence), and the config's ``rank_pattern``/``shape_pattern``
    hold every module's final rank and shape (``resolved=True``).
    """

    prefix: str = "soka_"
    tuner_layer_cls = SokaLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ---------------------------------------------------------------- preparation
    def _prepare_adapter_config(self, peft_config: SokaConfig, model_config: dict) -> SokaConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Plan (validate, decide ranks, decompose), create the layers, then record the decisions in the config.

        Overridden rather than done in PEFT's injection hooks because ``PeftModel.add_adapter`` and
        ``load_adapter`` call ``inject_adapter`` without those hooks.
        """
        config = self.peft_config[adapter_name]
        self._plan_adapter(model, config, adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._resolve_config(config, adapter_name)

    def _plan_adapter(self, model: nn.Module, config: SokaConfig, adapter_name: str) -> None:
        """Validate every target (type and factor shape) before any weight changes, and plan the shapes."""
        self.__dict__.setdefault("soka_selections", {})
        self.__dict__.setdefault("_soka_inits", {})
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        config = _maybe_include_all_linear_layers(config, model)
        plan: dict[str, KronShape] = {}
        for key, module in model.named_modules():
            if not key or any(key.startswith(k + ".") for k in plan):
                continue
            matched = self._check_target_module_exists(config, key)
            if not matched or isinstance(matched, _ExcludedModule):
                continue
            reason = _unsupported_reason(module)
            if reason is not None:
                raise ValueError(f"target module {key!r} {reason}")
            if config.init == "kpsvd" and isinstance(module, SokaLayer) and module.soka_residual:
                raise ValueError(
                    f"module {key!r} already holds a kpsvd SoKA adapter, whose residual the base weight carries; "
                    "a second kpsvd adapter would take its components from that residual. Add further adapters "
                    "with init='zero', or export trained adapters with axolotl_soka.export_delta_adapter (they "
                    "then load side by side on the original model)"
                )
            base = module.get_base_layer() if isinstance(module, SokaLayer) else module
            spec = lookup_pattern(config.shape_pattern, key)
            shape = resolve_shape(
                spec if spec is not None else config.factor_shape, base.out_features, base.in_features, key
            )
            if config.resolved and lookup_pattern(config.rank_pattern, key) is None:
                raise ValueError(
                    f"the saved SoKA config (resolved=True) has no rank for module {key!r}; it does not belong to "
                    "this model"
                )
            plan[key] = shape
        if not plan:
            examples = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
            raise ValueError(
                f"target_modules {config.target_modules!r} matched no module of the model; its linear layers are "
                f"named like {examples}"
            )
        modules = dict(model.named_modules())
        targets = []
        for key, shape in plan.items():
            module = modules[key]
            targets.append((key, module.get_base_layer() if isinstance(module, SokaLayer) else module, shape))
        self._soka_inits[adapter_name] = decide_all(config, targets, desc=f"SoKA init ({adapter_name})")
        self.soka_selections[adapter_name] = {
            key: ModuleSelection(
                name=key,
                out_features=base.out_features,
                in_features=base.in_features,
                shape=shape,
                decision=self._soka_inits[adapter_name][key].decision,
                sigma_mode=config.sigma_mode,
            )
            for key, base, shape in targets
        }

    def _create_and_replace(
        self,
        peft_config: SokaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        shape = self.soka_selections[adapter_name][current_key].shape
        init = self._soka_inits[adapter_name].pop(current_key)
        decision, factors = init.decision, init.factors
        if decision.rank == 0:
            return  # left unadapted; reported
        layer_kwargs = dict(
            init=peft_config.init,
            sigma_mode=peft_config.sigma_mode,
            alpha=peft_config.alpha,
            dropout=peft_config.dropout,
            factors=factors,
            seed=peft_config.seed ^ zlib.crc32(current_key.encode()),
        )
        if isinstance(target, SokaLayer):
            target.update_layer(adapter_name, shape, decision.rank, **layer_kwargs)
            return
        new_module = SokaLinear(target, adapter_name, shape, decision.rank, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _resolve_config(self, config: SokaConfig, adapter_name: str) -> None:
        """Write every module's final rank and shape into the config, so saving and loading never re-select."""
        self._soka_inits.pop(adapter_name, None)
        selections = self.soka_selections.get(adapter_name, {})
        config.rank_pattern = {name: sel.rank for name, sel in selections.items()}
        config.shape_pattern = {name: sel.shape.as_list() for name, sel in selections.items()}
        config.resolved = True

    # ---------------------------------------------------------------- unloading
    def unload(self) -> nn.Module:
        """Remove the adapters without merging and give back the original weights (residual restored)."""
        for module in self.model.modules():
            if isinstance(module, SokaLayer):
                for adapter, applied in list(module.soka_residual.items()):
                    if applied:
                        module.apply_residual(adapter, sign=+1.0)
        return self._unload_and_optionally_merge(merge=False)
