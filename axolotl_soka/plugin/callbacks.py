"""Trainer callbacks of the SoKA plugin: ranks and parameter counts to the trainer's loggers."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from ..report import adapter_stats, load_report, markdown_table

LOG = logging.getLogger(__name__)


class SokaStatsCallback(TrainerCallback):
    """Logs ``soka/trainable_params``, ``soka/adapter_params``, ``soka/total_terms``, ``soka/mean_rank``,
    ``soka/adapted_modules`` and ``soka/mean_rank/<module kind>`` once, at train begin, through
    ``trainer.log`` (so TensorBoard, W&B and the other ``report_to`` integrations receive them).

    The stats are read from the model before DeepSpeed partitions it; the rank table (when a report exists in
    ``output_dir``) also goes to TensorBoard as text and to W&B as a table.
    """

    def __init__(self, trainer: Any, output_dir: str | None = None) -> None:
        self.trainer = trainer
        self.output_dir = output_dir
        self.stats = {f"soka/{k}": v for k, v in adapter_stats(trainer.model).items()}
        self._logged = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._logged:
            return
        self._logged = True
        self.trainer.log(dict(self.stats))
        if state.is_world_process_zero:
            self._log_table()

    def _log_table(self) -> None:
        """The per-module rank table as TensorBoard text and a W&B table, when those loggers are active."""
        if not self.output_dir:
            return
        try:
            report = load_report(self.output_dir)
        except (FileNotFoundError, ValueError):
            return
        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None and hasattr(writer, "add_text"):
                writer.add_text("soka/rank_report", markdown_table(report), global_step=0)
        try:
            import wandb
        except ImportError:
            return
        if getattr(wandb, "run", None) is None:
            return
        columns = ["module", "shape", "rank", "energy_kept", "decided_by", "trainable_params"]
        rows = [[str(m["module"]), str(m["shape"]), m["rank"], m["energy_kept"], m["decided_by"],
                 m["trainable_params"]] for m in report["modules"]]  # fmt: skip
        wandb.run.log({"soka/rank_report": wandb.Table(columns=columns, data=rows)}, commit=False)
