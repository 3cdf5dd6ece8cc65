"""``type: axolotl_soka.prompt_strategies.gsm8k``: ``Question: …\\nAnswer: `` then the worked answer (``#### n``);
rows need ``question`` and ``answer``. Equivalent to the user-defined mapping in the example configs."""

from __future__ import annotations

from typing import Any

from .task import TaskPromptTokenizingStrategy, load_task


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None) -> TaskPromptTokenizingStrategy:
    return load_task("gsm8k", tokenizer, cfg)
