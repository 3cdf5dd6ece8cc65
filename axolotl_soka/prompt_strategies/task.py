"""A tokenizing strategy for one evaluation task's prompt format (GSM8K, MATH or MBPP)."""

from __future__ import annotations

from typing import Any

from axolotl.prompt_tokenizers import IGNORE_INDEX, PromptTokenizingStrategy

from ..prompts import build_prompt, build_target


class TaskPromptTokenizingStrategy(PromptTokenizingStrategy):
    """``build_prompt(task, row)`` then ``build_target(task, row)`` + EOS, tokenized separately the way
    Axolotl's instruction strategies do (the prompt's ids are exactly what evaluation feeds the model)."""

    def __init__(self, task: str, tokenizer: Any, train_on_inputs: bool = False, sequence_len: int = 2048):
        super().__init__(None, tokenizer, train_on_inputs, sequence_len)
        self.task = task

    def tokenize_prompt(self, prompt: dict[str, Any]) -> dict[str, list[int]]:
        tokenized = self._tokenize(build_prompt(self.task, prompt), add_eos_token=False)
        if not self.train_on_inputs:
            tokenized["labels"] = [IGNORE_INDEX] * len(tokenized["input_ids"])
        response = self._tokenize(build_target(self.task, prompt), strip_bos_token=True, add_eos_token=True)
        tokenized["input_ids"] += response["input_ids"]
        tokenized["attention_mask"] += response["attention_mask"]
        tokenized["labels"] += response["input_ids"]
        return dict(tokenized)


def load_task(task: str, tokenizer: Any, cfg: Any) -> TaskPromptTokenizingStrategy:
    """The strategy for ``task`` with the run's ``train_on_inputs`` and ``sequence_len``."""
    return TaskPromptTokenizingStrategy(
        task, tokenizer, train_on_inputs=bool(cfg.train_on_inputs), sequence_len=cfg.sequence_len
    )
