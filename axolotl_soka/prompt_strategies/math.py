"""``type: axolotl_soka.prompt_strategies.math``: ``Problem: …\\nSolution: `` then the solution (``\\boxed{…}``);
rows need ``problem`` and ``solution``. Equivalent to the user-defined mapping in the example configs."""

from __future__ import annotations

from typing import Any

from .task import TaskPromptTokenizingStrategy, load_task


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None) -> TaskPromptTokenizingStrategy:
    return load_task("math", tokenizer, cfg)
