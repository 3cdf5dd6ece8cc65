"""``SokaPlugin``: ``adapter: soka`` for Axolotl (``plugins: [axolotl_soka.SokaPlugin]``).

The plugin declares the ``soka`` adapter, adds the ``soka_*`` YAML keys, and in ``load_adapter`` returns a PEFT
model built by the core library, so Axolotl's own save (adapter only), resume, legacy merge and inference
paths apply unchanged. Every hook does nothing unless ``adapter: soka``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .args import ADAPTER_NAME, KEY_TO_FIELD, check_written_keys, written_soka_keys
from .extras import missing_extra

try:
    from axolotl.integrations.base import AdapterCapabilities, BasePlugin
except ImportError as exc:  # axolotl is an optional dependency (the ``axolotl`` extra)
    raise missing_extra(exc, "axolotl") from exc

LOG = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"

# The DeepSpeed settings Axolotl's ``setup_deepspeed_env`` exports for a ``deepspeed:`` config, which the model
# loader reads back (it also sets the accumulation steps and, on one process, the rank variables: harmless).
DEEPSPEED_ENV = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT",
)


def _is_soka(cfg: Any) -> bool:
    return (cfg.get("adapter") if hasattr(cfg, "get") else getattr(cfg, "adapter", None)) == ADAPTER_NAME


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def target_modules_key(cfg: Any) -> str | None:
    """The YAML key that chooses the targets: ``soka_target_modules``, else ``lora_target_modules`` (unless
    ``lora_target_linear``), else ``None`` (every linear layer except the output head)."""
    if cfg.soka_target_modules:
        return "soka_target_modules"
    if cfg.lora_target_modules and not cfg.lora_target_linear:
        return "lora_target_modules"
    return None


def target_modules(cfg: Any) -> list[str] | str | None:
    """The targets the YAML chooses (:func:`target_modules_key`); ``None``: every linear layer but the head."""
    key = target_modules_key(cfg)
    return cfg[key] if key else None


def soka_config_from_cfg(cfg: Any) -> Any:
    """A fresh (unresolved) ``SokaConfig`` from the validated Axolotl config (unset keys: ``SokaConfig``'s
    defaults; ``soka_seed`` took the YAML's ``seed`` at validation, see ``apply_axolotl_fallbacks``)."""
    from ..tuner.config import SokaConfig

    kwargs = {field: cfg[key] for key, field in KEY_TO_FIELD.items() if cfg.get(key) is not None}
    kwargs["target_modules"] = target_modules(cfg)
    if cfg.lora_modules_to_save:
        kwargs["modules_to_save"] = list(cfg.lora_modules_to_save)
    if cfg.peft_layers_to_transform:
        kwargs["layers_to_transform"] = list(cfg.peft_layers_to_transform)
    if cfg.peft_layers_pattern:
        kwargs["layers_pattern"] = list(cfg.peft_layers_pattern)
    return SokaConfig(**kwargs)


def resume_checkpoint(cfg: Any) -> str | None:
    """The checkpoint this run resumes from (``resume_from_checkpoint``, or the last ``checkpoint-N`` in
    ``output_dir`` with ``auto_resume_from_checkpoints``), when it holds a saved adapter."""
    path = cfg.resume_from_checkpoint
    if not path and cfg.auto_resume_from_checkpoints and cfg.output_dir:
        steps = [p for p in Path(cfg.output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        path = str(max(steps, key=lambda p: int(p.name.split("-")[-1]))) if steps else None
    if path and (Path(path) / CONFIG_NAME).is_file():
        return str(path)
    return None


def check_ranks_agree(rank_pattern: dict[str, int]) -> None:
    """In a distributed run every process must have chosen the same ranks, or the adapter shapes (and DeepSpeed's
    parameter partitioning) would differ between processes; raise a clear error instead of a hang."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    patterns: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(patterns, dict(rank_pattern))
    differ = sorted({name for p in patterns for name in p if p.get(name) != patterns[0].get(name)})
    if differ:
        raise RuntimeError(
            f"SoKA chose different ranks on different processes for {len(differ)} modules (first: {differ[0]}: "
            f"{[p.get(differ[0]) for p in patterns]}); use soka_svd: full, or fix the ranks with soka_rank_pattern"
        )


LM_EVAL_PLUGIN = "axolotl.integrations.lm_eval.LMEvalPlugin"


def check_lm_eval_plugin(cfg: dict) -> None:
    """Refuse Axolotl's lm_eval plugin on a SoKA run unless ``lm_eval_model`` names what to evaluate.

    After training it runs ``lm_eval --model hf --model_args pretrained=<output_dir>``: no ``peft=`` and no
    ``import axolotl_soka`` in that process, while a SoKA ``output_dir`` holds only the adapter, so it would
    fail once the whole training is done. ``lm_eval_post_train: false`` or no ``lm_eval_tasks`` runs nothing.
    """
    if LM_EVAL_PLUGIN not in (cfg.get("plugins") or []):
        return
    if cfg.get("lm_eval_post_train") is False or not cfg.get("lm_eval_tasks") or cfg.get("lm_eval_model"):
        return
    raise ValueError(
        f"plugins: {LM_EVAL_PLUGIN} with adapter: soka would run lm_eval on output_dir "
        f"({cfg.get('output_dir')!r}) as a full model after training, but a SoKA run saves only the adapter "
        "there, and lm_eval's process does not import axolotl_soka. Either set lm_eval_post_train: false and, "
        "after training, merge (python -m axolotl.cli.merge_lora CONFIG.yml) and run lm_eval --model hf "
        "--model_args pretrained=OUTPUT_DIR/merged; or set lm_eval_model to a merged model folder"
    )


def clear_stale_deepspeed_env() -> None:
    """Remove ``DEEPSPEED_ENV`` from the environment, for a merge that runs without DeepSpeed.

    ``axolotl.cli.merge_lora`` loads the YAML twice in one process: first as written (a ``deepspeed:`` ZeRO-3
    config exports ``ACCELERATE_DEEPSPEED_ZERO_STAGE=3``), then with ``deepspeed=None`` and ``merge_lora=True``
    for the merge, whose model loader reads the stage back and builds ``HfTrainerDeepSpeedConfig(None)`` (a
    ``TypeError``). A SoKA merge (``merge_method: legacy``) loads the model on one process without DeepSpeed.
    """
    stale = [key for key in DEEPSPEED_ENV if key in os.environ]
    for key in stale:
        del os.environ[key]
    if stale:
        LOG.info("SoKA merge runs without DeepSpeed: removed %s from the environment", ", ".join(stale))


class SokaPlugin(BasePlugin):
    """Axolotl plugin for SoKA; see ``docs/plugin.md`` for the YAML keys."""

    def register(self, cfg: dict) -> None:
        """Check the raw YAML (as written, before Axolotl's validation fills defaults)."""
        if cfg.get("adapter") != ADAPTER_NAME:
            ignored = written_soka_keys(cfg)
            LOG.warning(
                "SokaPlugin is enabled but adapter is %r; set `adapter: soka` to train SoKA. The plugin does "
                "nothing%s.",
                cfg.get("adapter"),
                f"; these keys are ignored: {', '.join(ignored)}" if ignored else "",
            )
            return
        check_written_keys(cfg)
        fp32_gradients = cfg.get("lora_fp32_gradients")
        if fp32_gradients:
            # Raised here, before validation: Axolotl 0.21's own check only says it "requires a LoRA adapter".
            raise ValueError(
                f"lora_fp32_gradients={fp32_gradients!r} does not apply to adapter: soka: SoKA's factors and "
                "their gradients are always fp32 (cast to the compute dtype only inside the forward); remove "
                "lora_fp32_gradients from the config"
            )
        check_lm_eval_plugin(cfg)
        if cfg.get("merge_lora") and not cfg.get("deepspeed"):
            clear_stale_deepspeed_env()

    def pre_model_load(self, cfg: Any) -> None:
        """Check the SoKA settings against the model's config (built on the meta device, no weights), so that
        bad targets, shapes, patterns or budgets fail before a long load (see ``preflight``)."""
        if not _is_soka(cfg):
            return
        from .preflight import check_against_model_config

        check_against_model_config(cfg)

    def get_input_args(self) -> str:
        return "axolotl_soka.plugin.args.SokaArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=ADAPTER_NAME)]

    def load_adapter(
        self, model: Any, cfg: Any, inference: bool = False, config_only: bool = False
    ) -> tuple[Any, Any] | None:
        """Return ``(PeftModel, SokaConfig)``: loaded from ``lora_model_dir`` or the resume checkpoint (saved
        ranks and shapes, no SVD), else initialised from the base weights (KPSVD and rank selection)."""
        if not _is_soka(cfg):
            return None
        from peft import PeftModel, get_peft_model

        source = cfg.lora_model_dir or resume_checkpoint(cfg)
        if config_only:
            return None, self._saved_config(source) if source else soka_config_from_cfg(cfg)
        if source:
            LOG.info("Loading the SoKA adapter from %s (saved ranks and shapes; no decomposition)", source)
            peft_model = PeftModel.from_pretrained(model, str(source), is_trainable=not inference)
        else:
            config = soka_config_from_cfg(cfg)
            if config.init_source == "gradient":
                self._calibrate(model, config, cfg)
            peft_model = get_peft_model(model, config)
            check_ranks_agree(peft_model.peft_config["default"].rank_pattern)
            self._report(peft_model, cfg)
        if _is_main_process():
            peft_model.print_trainable_parameters()
        return peft_model, peft_model.peft_config["default"]

    @staticmethod
    def _calibrate(model: Any, config: Any, cfg: Any) -> None:
        """Training-loss gradients over ``soka_calibration_batches`` batches of the prepared training dataset
        (loaded again from Axolotl's cache), attached to ``model`` for ``get_peft_model``."""
        from axolotl.common.datasets import load_datasets

        from ..tuner.calibration import calibrate_gradients
        from ..tuner.distributed import process_info
        from .calibration_data import calibration_batches

        rank, world = process_info()
        dataset = load_datasets(cfg=cfg).train_dataset
        batches = calibration_batches(
            dataset, cfg.soka_calibration_batches or 8, cfg.micro_batch_size or 1, cfg.seed or 0, rank, world
        )
        result = calibrate_gradients(model, config, batches)
        LOG.info(
            "SoKA gradient calibration: %d batches, %d tokens, mean loss %.4f, %.1f s",
            result.batches,
            result.tokens,
            result.mean_loss,
            result.seconds,
        )

    @staticmethod
    def _saved_config(source: str) -> Any:
        from peft import PeftConfig

        return PeftConfig.from_pretrained(str(source))

    @staticmethod
    def _report(peft_model: Any, cfg: Any) -> None:
        """Rank report of a fresh initialisation: printed, and saved to ``output_dir`` (main process only)."""
        if not cfg.soka_report or not _is_main_process():
            return
        from ..report import write_report

        selections = peft_model.base_model.soka_selections.get("default", {})
        try:
            write_report(selections, peft_model.peft_config["default"], cfg.output_dir or ".")
        except Exception as exc:  # noqa: BLE001 - a report must never stop training
            LOG.warning("Could not write the SoKA rank report: %s", exc)

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        if not _is_soka(cfg):
            return []
        from .callbacks import SokaStatsCallback

        callbacks: list = [SokaStatsCallback(trainer, output_dir=cfg.output_dir)]
        eval_callback = self._eval_callback(cfg, trainer)
        if eval_callback is not None:
            callbacks.append(eval_callback)
        return callbacks

    @staticmethod
    def _eval_callback(cfg: Any, trainer: Any) -> Any:
        """``SampleEvalCallback`` (benchmark accuracy on held-out problems) for ``soka_eval_task``."""
        if not cfg.soka_eval_task:
            return None
        from ..eval.callback import SampleEvalCallback
        from ..eval.data import load as load_records

        split = "validation" if cfg.soka_eval_task == "mbpp" and not cfg.soka_eval_data else "all"
        data = load_records(cfg.soka_eval_task, cfg.soka_eval_data, mbpp_split=split)
        return SampleEvalCallback(
            cfg.soka_eval_task,
            data.records,
            trainer.processing_class,
            every=cfg.soka_eval_steps,
            limit=cfg.soka_eval_samples or 32,
            max_new_tokens=cfg.soka_eval_max_new_tokens or 256,
            on_evaluate=True,
            trainer=trainer,
        )
