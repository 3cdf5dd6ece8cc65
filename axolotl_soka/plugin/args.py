"""YAML keys of the SoKA plugin (``soka_*``), merged into Axolotl's config schema.

The keys are generated from :class:`axolotl_soka.SokaConfig`'s fields (``soka_<field>``: type, default and help
from the dataclass), plus the few plugin-only keys defined here; ``docs/plugin.md``'s key table is rendered from
the same list (``axolotl_soka.plugin.keys_doc``). The rules live in ``SokaConfig`` and are reused: a
``model_validator`` builds a ``SokaConfig`` from the keys and re-raises its ``ValueError`` under the ``soka_*``
key name, so a bad value fails at config validation, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from pathlib import Path
from typing import Any

from ..prompts import TASKS
from .extras import missing_extra

try:
    from pydantic import BaseModel, Field, create_model, model_validator
except ImportError as exc:  # pydantic comes with axolotl, not with the core package
    raise missing_extra(exc, "pydantic") from exc

from peft.config import PeftConfig

from ..tuner.config import SokaConfig

ADAPTER_NAME = "soka"
PREFIX = "soka_"  # of every YAML key the plugin defines

# SokaConfig fields that are not YAML keys: Axolotl's own keys set them, or saving does. Every other field of
# SokaConfig (not of PeftConfig) is the key soka_<field>.
NOT_KEYS: dict[str, str] = {
    "layers_to_transform": "peft_layers_to_transform",
    "layers_pattern": "peft_layers_pattern",
    "modules_to_save": "lora_modules_to_save",
    "resolved": "written on save",
}
# Keys the plugin resolves itself (with Axolotl's lora_target_modules) instead of passing them on as written
RESOLVED_BY_PLUGIN = ("soka_target_modules",)
# SoKA key -> Axolotl key whose value (as written in the config) it takes when unset
AXOLOTL_FALLBACK: dict[str, str] = {"soka_seed": "seed"}
# What the plugin adds to a generated key: a default of its own, and a note after the field's help
YAML_DEFAULTS: dict[str, str] = {
    "soka_target_modules": "`lora_target_modules` when set (and `lora_target_linear` is not), else every "
    "linear layer of the decoder except `lm_head`",
    "soka_seed": "the config's `seed` when set, else `0`",
}
YAML_NOTES: dict[str, str] = {
    "soka_init_source": "The plugin calibrates on `soka_calibration_batches` training batches.",
    "soka_seed": "An explicit `soka_seed` wins over `seed`; Axolotl's own default for an unset `seed` (42) "
    "does not count.",
    "soka_forward_mode": "`dense` applies to plain `nn.Linear` layers without module hooks and without active "
    "dropout, so under DeepSpeed ZeRO-3 the layers stay factored.",
}


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """One YAML key: what the pydantic field and the docs table are built from."""

    key: str
    annotation: Any
    default: Any
    help: str
    default_text: str | None = None  # words for a default its value does not say
    field: str | None = None  # the SokaConfig field, None for a plugin-only key


PLUGIN_KEYS: list[KeySpec] = [
    KeySpec(
        "soka_calibration_batches",
        int,
        8,
        "Training batches (`micro_batch_size` rows each, all processes together, rounded down to a multiple "
        "of the process count, at least one per process) whose loss gradient calibrates the spectra with "
        "`soka_init_source: gradient` (≥ 1).",
    ),
    KeySpec(
        "soka_report",
        bool,
        True,
        "Print the rank report and write `soka_rank_report.json` / `.png` to `output_dir` after init.",
    ),
    KeySpec(
        "soka_eval_task",
        str | None,
        None,
        f"{', '.join(f'`{t}`' for t in TASKS)}: during training, greedy-generate on held-out problems and log "
        "`eval_<task>_accuracy` at every evaluation and at the end. Single device or DDP only (not ZeRO-3 / "
        "FSDP).",
    ),
    KeySpec(
        "soka_eval_data",
        str | None,
        None,
        "Held-out records for `soka_eval_task`: a .jsonl/.json file or a Hub dataset name.",
        "the shipped test set (MBPP: validation tasks 511-600)",
    ),
    KeySpec("soka_eval_samples", int | None, None, "Problems scored per evaluation (≥ 1).", "`32`"),
    KeySpec(
        "soka_eval_steps",
        int | None,
        None,
        "Also evaluate every this many optimizer steps (≥ 1).",
        "only at evaluations",
    ),
    KeySpec("soka_eval_max_new_tokens", int | None, None, "Generation budget per problem (≥ 1).", "`256`"),
]
POSITIVE_INT_KEYS = (
    "soka_eval_samples",
    "soka_eval_steps",
    "soka_eval_max_new_tokens",
    "soka_calibration_batches",
)


def config_keys(config_cls: type = SokaConfig) -> list[KeySpec]:
    """The YAML keys generated from ``config_cls``'s own dataclass fields (all but ``NOT_KEYS``), in field order.

    A key whose default the plugin decides (``AXOLOTL_FALLBACK``) or whose field has a ``default_factory`` is
    ``None`` when unset, so that "not written" stays visible to the plugin.
    """
    hints = typing.get_type_hints(config_cls)
    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    own = [f for f in dataclasses.fields(config_cls) if f.name not in peft_fields and f.name not in NOT_KEYS]
    names = {f.name: PREFIX + f.name for f in own}

    def yaml_text(text: str) -> str:
        # a field name in backticks is shown under its YAML key
        return re.sub(r"`(\w+)`", lambda m: f"`{names.get(m.group(1), m.group(1))}`", text)

    specs = []
    for f in own:
        key = names[f.name]
        annotation = hints[f.name]
        default = None if key in AXOLOTL_FALLBACK or f.default is dataclasses.MISSING else f.default
        if default is None and type(None) not in typing.get_args(annotation):
            annotation = annotation | None
        text = yaml_text(f.metadata.get("help", ""))
        if key in YAML_NOTES:
            text = f"{text} {YAML_NOTES[key]}"
        default_text = YAML_DEFAULTS.get(key) or (
            yaml_text(f.metadata["default"]) if "default" in f.metadata else None
        )
        specs.append(KeySpec(key, annotation, default, text, default_text, f.name))
    return specs


KEYS: list[KeySpec] = [*config_keys(), *PLUGIN_KEYS]
# YAML key -> SokaConfig field, for the keys passed on to SokaConfig as written
KEY_TO_FIELD: dict[str, str] = {
    spec.key: spec.field for spec in KEYS if spec.field is not None and spec.key not in RESOLVED_BY_PLUGIN
}
FIELD_TO_KEY = {field: key for key, field in KEY_TO_FIELD.items()}
_FIELD_RE = re.compile(
    r"(?<![\w.\-])(" + "|".join(sorted(FIELD_TO_KEY, key=len, reverse=True)) + r")(?![\w\-])"
)


def rename_fields(message: str) -> str:
    """Replace ``SokaConfig`` field names in a core error message by their ``soka_*`` YAML keys."""
    return _FIELD_RE.sub(lambda m: FIELD_TO_KEY[m.group(1)], message)


def _core_config(kwargs: dict[str, Any]) -> SokaConfig:
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
    for key in POSITIVE_INT_KEYS:
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


class _SokaValidation(BaseModel):
    """The checks of the ``soka_*`` keys; the keys themselves are added by ``create_model`` below."""

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


def _pydantic_field(spec: KeySpec) -> tuple[Any, Any]:
    description = spec.help + (f" Default: {spec.default_text}." if spec.default_text else "")
    return spec.annotation, Field(default=spec.default, description=description)


# Axolotl imports this class by name (get_input_args) and merges it into its config model as a base class.
SokaArgs = create_model(
    "SokaArgs",
    __base__=_SokaValidation,
    __module__=__name__,
    __doc__="Input arguments of the SoKA plugin (active with ``adapter: soka``).",
    **{spec.key: _pydantic_field(spec) for spec in KEYS},
)


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
