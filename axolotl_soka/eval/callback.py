"""Benchmark accuracy during training: :class:`SampleEvalCallback`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

from ..prompts import STOP_STRINGS, TASKS, build_prompt
from .generate import hf_generate
from .scoring import score_many

logger = logging.getLogger(__name__)


class SampleEvalCallback(TrainerCallback):
    """Greedy-generate on a small held-out sample with the training model and log ``eval_<task>_accuracy``.

    Runs at the end of training, every ``every`` optimizer steps when ``every`` is set, and after each
    evaluation when ``on_evaluate`` is true. Prompts are the training prompts
    (:func:`axolotl_soka.prompts.build_prompt`); scoring is the one of ``python -m axolotl_soka.eval``.

    The metric goes through ``trainer.log`` so TensorBoard, W&B and ``trainer.state.log_history`` get
    it. Callbacks are not given the trainer, so pass ``trainer=`` or call :meth:`bind` once it exists
    (e.g. in a plugin's ``add_callbacks_post_trainer``); unbound, the metric is appended to
    ``state.log_history`` and logged with :mod:`logging` only.

    Generation runs on the main process only, with the unwrapped model; it suits single-device and DDP
    training, not sharded models (FSDP, DeepSpeed ZeRO-3).

    Args:
        task: ``gsm8k``, ``math`` or ``mbpp``.
        records: held-out data records in the task's schema (see :mod:`axolotl_soka.eval.data`).
        tokenizer: the training tokenizer.
        every: evaluate every this many steps as well (``None``: only at the end / on evaluate).
        limit: use the first ``limit`` records.
        batch_size: generation batch size.
        max_new_tokens: generation budget per item.
        on_evaluate: also evaluate after every ``Trainer.evaluate``.
        trainer: the trainer whose ``log`` receives the metric.
    """

    def __init__(
        self,
        task: str,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        every: int | None = None,
        limit: int = 32,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        on_evaluate: bool = False,
        trainer: Any = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task: unknown task {task!r}; allowed: {', '.join(TASKS)}")
        if limit < 1 or (every is not None and every < 1):
            raise ValueError("limit and every must be >= 1")
        self.task = task
        self.records = [dict(r) for r in list(records)[:limit]]
        if not self.records:
            raise ValueError("records: no held-out records to evaluate on")
        self.tokenizer = tokenizer
        self.every = every
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.eval_on_evaluate = on_evaluate
        self.trainer = trainer
        self._last_step: int | None = None

    def bind(self, trainer: Any) -> SampleEvalCallback:
        """Log through ``trainer.log`` from now on; returns ``self``."""
        self.trainer = trainer
        return self

    def evaluate(self, model: Any) -> dict[str, float]:
        """Generate and score the sample with ``model``; returns ``{"eval_<task>_accuracy": ...}``."""
        prompts = [build_prompt(self.task, r) for r in self.records]
        completions = [""] * len(prompts)
        for indices, texts in hf_generate(
            model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            stop_strings=STOP_STRINGS[self.task],
            batch_size=self.batch_size,
        ):
            for i, text in zip(indices, texts, strict=True):
                completions[i] = text
        verdicts = score_many(self.task, completions, self.records)
        accuracy = sum(v.correct for v in verdicts) / len(verdicts)
        return {f"eval_{self.task}_accuracy": accuracy}

    def _run(self, state: Any, model: Any) -> None:
        if model is None or not state.is_world_process_zero or self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        metrics = self.evaluate(model)
        logger.info("step %d: %s", state.global_step, metrics)
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Evaluate every ``every`` steps."""
        if self.every and state.global_step % self.every == 0:
            self._run(state, model)

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Evaluate after ``Trainer.evaluate`` when ``on_evaluate`` is set."""
        if self.eval_on_evaluate:
            self._run(state, model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Evaluate once training is over (skipped if this step was just evaluated)."""
        self._run(state, model)
