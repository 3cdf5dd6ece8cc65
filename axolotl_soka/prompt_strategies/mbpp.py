"""``type: axolotl_soka.prompt_strategies.mbpp``: the original MBPP prompt (task, three test asserts, ``[BEGIN]``)
and the reference code followed by ``[DONE]``; rows need ``text``, ``test_list`` and ``code``."""

from __future__ import annotations

from typing import Any

from .task import TaskPromptTokenizingStrategy, load_task


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None) -> TaskPromptTokenizingStrategy:
    return load_task("mbpp", tokenizer, cfg)
