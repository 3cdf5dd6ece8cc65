"""``SokaModel``: injects SoKA layers into a model (PEFT ``BaseTuner``)."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..kron.dense_forward import release_workspace
from .calibration import take_calibration
from .config import SokaConfig
from .initializer import ModuleInit, decide_all
from .layer import SokaLayer, SokaLinear
from .selection import ModuleSelection
from .targets import default_targets, find_targets


def _top_candidates(init: ModuleInit, count: int = 5) -> list[dict[str, Any]] | None:
    """The best ``count`` shapes of an ``auto`` shape search, for reports (``None`` without a search)."""
    if init.search is None:
        return None
    return [
        {"shape": c.shape.as_list(), "terms": c.terms, "params": c.params, "energy_kept": c.energy_kept}
        for c in init.search.candidates[:count]
    ]


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
        return default_targets(peft_config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Plan (validate, decide ranks, decompose), create the layers, then record the decisions in the config.

        Overridden rather than done in PEFT's injection hooks because ``PeftModel.add_adapter`` and
        ``load_adapter`` call ``inject_adapter`` without those hooks.
        """
        # resolving writes ranks and shapes into the config: work on a copy so that the caller's config object
        # can build further models (resolved, it would expect its factors from a checkpoint)
        config = self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        self._plan_adapter(model, config, adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._resolve_config(config, adapter_name)

    def _plan_adapter(self, model: nn.Module, config: SokaConfig, adapter_name: str) -> None:
        """Validate every target (type and factor shape) before any weight changes, then decide shapes, ranks
        and initial factors (using the gradient calibration attached to ``model``, if any)."""
        self.__dict__.setdefault("soka_selections", {})
        self.__dict__.setdefault("_soka_inits", {})
        calibration = take_calibration(model)  # consumed (and its memory released) whatever happens next
        targets = find_targets(model, config)
        inits = decide_all(config, targets, calibration, desc=f"SoKA init ({adapter_name})")
        self._soka_inits[adapter_name] = inits
        self.soka_selections[adapter_name] = {
            t.name: ModuleSelection(
                name=t.name,
                out_features=t.linear.out_features,
                in_features=t.linear.in_features,
                shape=inits[t.name].shape,
                decision=inits[t.name].decision,
                sigma_mode=config.sigma_mode,
                source=config.init_source if not config.resolved else "stored",
                shape_candidates=_top_candidates(inits[t.name]),
            )
            for t in targets
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
            init="zero" if peft_config.init == "zero" else "kpsvd",  # gradient init: residual like kpsvd
            sigma_mode=peft_config.sigma_mode,
            alpha=peft_config.alpha,
            dropout=peft_config.dropout,
            chunk_tokens=peft_config.chunk_tokens,
            forward_mode=peft_config.forward_mode,
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

    # ---------------------------------------------------------------- unsupported PEFT options
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """SoKA keeps its factors in fp32 whatever the base dtype (the forward casts them), so there is
        nothing to cast; ``autocast_adapter_dtype=False`` (factors in the base dtype) is not supported."""
        if not autocast_adapter_dtype:
            raise ValueError(
                "autocast_adapter_dtype=False is unsupported for SoKA: its factors always stay in fp32"
            )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Refuse ``adapter_names=`` (mixed-batch inference): SoKA layers run the active adapters on every
        row. ``PeftModel`` enters this around every forward and ``generate`` while an adapter is enabled."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError("adapter_names= (mixed-batch inference) is unsupported for SoKA")
        yield

    # ---------------------------------------------------------------- deleting and unloading
    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; its layers give their ``ΔW0`` back to the base weight (see ``SokaLayer``)."""
        super().delete_adapter(adapter_name)
        self.soka_selections.pop(adapter_name, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        """PEFT's unloading (``unload``, ``merge_and_unload``), then the dense forward's reused CPU buffers
        (one weight-sized tensor per shape, :func:`~axolotl_soka.kron.dense_forward.release_workspace`) are
        freed: no SoKA layer is left to use them."""
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        release_workspace()
        return model

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and give back the original weights (residual restored)."""
        for module in self.model.modules():
            if isinstance(module, SokaLayer):
                for adapter, applied in list(module.soka_residual.items()):
                    if applied:
                        module.apply_residual(adapter, sign=+1.0)
        return self._unload_and_optionally_merge(merge=False)
