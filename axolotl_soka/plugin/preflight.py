"""Check ``adapter: soka`` against the model's config before any weights load.

The model is built from its ``config.json`` on the meta device (no memory, no weights) and SoKA's own target
discovery and shape resolution run on it, so a factor shape that does not divide, targets that match nothing,
pattern keys naming no module or a budget below one term fail in seconds, not after a multi-minute (ZeRO-3)
load. Messages name the YAML keys. Nothing is downloaded: without a local config the check is skipped.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..kron.budget import check_budget_floor, parse_budget
from ..kron.shape_search import term_cost
from ..kron.shapes import ShapeError, balanced_shape
from ..tuner.selection import pattern_key, pattern_matches
from ..tuner.targets import NoTargetError, Target, find_targets
from .args import rename_fields

LOG = logging.getLogger(__name__)

EXAMPLES = 8  # module names quoted in a message


def skeleton_model(cfg: Any) -> Any | None:
    """The model of ``cfg.base_model`` built from its local config on the meta device, or ``None`` (logged at
    debug) when that config is not available offline or the architecture cannot be built from it."""
    import torch
    import transformers

    name = cfg.base_model_config or cfg.base_model
    if not name:
        return None
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code is True, "local_files_only": True}
    if cfg.revision_of_model:
        kwargs["revision"] = cfg.revision_of_model
    try:
        config = transformers.AutoConfig.from_pretrained(str(name), **kwargs)
    except Exception as exc:  # noqa: BLE001 - not cached locally (or not a model): the loader will report it
        LOG.debug("SoKA pre-load check skipped: no local model config for %s (%s)", name, exc)
        return None
    for key, value in (cfg.overrides_of_model_config or {}).items():
        setattr(config, key, value)
    try:
        model_cls = _model_class(cfg, config)
        if model_cls is None:
            LOG.debug("SoKA pre-load check skipped: no model class for %s", type(config).__name__)
            return None
        # the class itself, not from_config: under ZeRO-3 from_config would partition through zero.Init
        with torch.device("meta"):
            return model_cls(config)
    except Exception as exc:  # noqa: BLE001 - an architecture the skeleton cannot build: the loader decides
        LOG.debug("SoKA pre-load check skipped: cannot build %s on the meta device (%s)", name, exc)
        return None


def _model_class(cfg: Any, config: Any) -> type | None:
    """The class Axolotl would instantiate (``type_of_model``, default ``AutoModelForCausalLM``), resolved
    for ``config`` without remote code (a remote-code model is skipped: its class would have to be
    imported)."""
    import transformers
    from transformers.models.auto.auto_factory import _get_model_class

    if cfg.is_multimodal:
        return None
    cls = getattr(transformers, cfg.type_of_model or "AutoModelForCausalLM", None)
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is not None:
        return _get_model_class(config, mapping) if type(config) in mapping else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return None


def linear_names(model: Any) -> list[str]:
    """Distinct last name parts of the model's ``nn.Linear`` modules, in order (``q_proj``,
    ``lm_head``...)."""
    from torch import nn

    names = [key.rsplit(".", 1)[-1] for key, m in model.named_modules() if isinstance(m, nn.Linear)]
    return list(dict.fromkeys(names))


def check_targets(cfg: Any, model: Any, config: Any) -> list[Target]:
    """SoKA's target discovery and shape resolution (``find_targets``) on ``model``, errors under YAML
    keys."""
    from .plugin import target_modules_key

    key = target_modules_key(cfg) or "soka_target_modules"
    value = cfg.get(key)
    try:
        return find_targets(model, copy.deepcopy(config))
    except NoTargetError:
        raise ValueError(
            f"{key}={value!r} matches no linear layer of {cfg.base_model}; allowed: module names or a regex "
            f"matching some of its linear layers: {', '.join(linear_names(model)[:EXAMPLES])}"
        ) from None
    except ShapeError as exc:
        pattern = pattern_key(config.shape_pattern, exc.module)
        where = f"soka_shape_pattern[{pattern!r}]" if pattern is not None else "soka_factor_shape"
        spec = config.shape_pattern[pattern] if pattern is not None else config.factor_shape
        raise ValueError(
            f"{where}={spec!r} is invalid for {cfg.base_model}: {exc}; allowed: [m, n, p, q] with "
            "m*p = out and n*q = in for every module it applies to, or balanced, lora, auto"
        ) from None
    except ValueError as exc:  # a target that cannot be adapted (not linear, quantised)
        raise ValueError(
            f"{key}={value!r} is invalid for {cfg.base_model}: {rename_fields(str(exc))}"
        ) from None


def check_patterns(config: Any, targets: list[Target]) -> None:
    """Every ``soka_rank_pattern`` / ``soka_shape_pattern`` key must apply to at least one target module."""
    names = [t.name for t in targets]
    for yaml_key, patterns in (
        ("soka_rank_pattern", config.rank_pattern),
        ("soka_shape_pattern", config.shape_pattern),
    ):
        for pattern in patterns:
            try:
                unused = not any(pattern_matches(pattern, name) for name in names)
            except Exception as exc:  # noqa: BLE001 - re.error: not a valid regex
                raise ValueError(f"{yaml_key} key {pattern!r} is not a valid regex: {exc}") from None
            if unused:
                short = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
                raise ValueError(
                    f"{yaml_key} key {pattern!r} (value {patterns[pattern]!r}) matches no target module; "
                    f"allowed: a target's full name (e.g. {names[0]!r}) or a regex matching its end, "
                    f"such as {', '.join(short[:EXAMPLES])}"
                )


def check_budget(config: Any, targets: list[Target]) -> None:
    """``soka_param_budget`` must buy the cheapest single term, and the terms that must stay
    (``soka_min_rank`` or a fixed ``soka_rank_pattern`` rank), counted with the cheapest shape where the
    shape is searched."""
    if config.param_budget is None:
        return
    budget = parse_budget(config.param_budget)
    sigma = 1 if config.sigma_mode == "separate" else 0
    costs, needed = [], 0
    for t in targets:
        # an auto shape is searched after loading: the balanced shape has the fewest parameters per term
        shape = t.shape or balanced_shape(t.linear.out_features, t.linear.in_features)
        cost = term_cost(shape, sigma)
        costs.append((cost, t.name, shape))
        fixed = pattern_key(config.rank_pattern, t.name)
        keep = config.rank_pattern[fixed] if fixed is not None else config.min_rank
        needed += min(keep, shape.max_rank if t.shape is not None else 1) * cost
    cheapest, name, shape = min(costs, key=lambda c: c[0])
    if budget < cheapest:
        raise ValueError(
            f"soka_param_budget={config.param_budget!r} ({budget:,} parameters) is smaller than one "
            f"Kronecker term: the cheapest costs {cheapest:,} parameters (module {name!r}, shape "
            f"{shape.as_list()}); allowed: at least {cheapest:,}"
        )
    try:
        check_budget_floor(budget, needed, len(targets))
    except ValueError as exc:
        raise ValueError(rename_fields(str(exc))) from None


def check_against_model_config(cfg: Any) -> None:
    """Run every check above for an ``adapter: soka`` config before the weights load; skipped (debug
    log) when a saved adapter decides (``lora_model_dir`` or a resume checkpoint) or no local model
    config exists."""
    from .plugin import resume_checkpoint, soka_config_from_cfg

    source = cfg.lora_model_dir or resume_checkpoint(cfg)
    if source:
        LOG.debug("SoKA pre-load check skipped: the saved adapter in %s decides targets and shapes", source)
        return
    model = skeleton_model(cfg)
    if model is None:
        return
    config = soka_config_from_cfg(cfg)
    targets = check_targets(cfg, model, config)
    check_patterns(config, targets)
    check_budget(config, targets)
    LOG.debug("SoKA pre-load check passed: %d target modules", len(targets))
