"""Prompt formats shared by the example training configs and the evaluation command.

One format per task, plain text (no chat template), so that Axolotl's dataset ``type:`` field
mappings can express it and evaluation prompts are byte-identical to training prompts:

- GSM8K: ``"Question: {question}\\nAnswer: "`` followed by the worked answer ending in ``#### n``.
- MATH: ``"Problem: {problem}\\nSolution: "`` followed by a solution ending in ``\\boxed{...}``.
- MBPP: the original MBPP prompt (Austin et al., 2021): task text, the three test asserts, then
  ``[BEGIN]``; the target is the code followed by ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TASKS = ("gsm8k", "math", "mbpp")

GSM8K_PROMPT = "Question: {question}\nAnswer: "
MATH_PROMPT = "Problem: {problem}\nSolution: "
MBPP_PROMPT = (
    "You are an expert Python programmer, and here is your task: {text} "
    "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
)
MBPP_END = "[DONE]"


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")


def build_prompt(task: str, record: Mapping[str, Any]) -> str:
    """The prompt for one data record (GSM8K: ``question``; MATH: ``problem``; MBPP: ``text``, ``test_list``)."""
    _check_task(task)
    if task == "gsm8k":
        return GSM8K_PROMPT.format(question=record["question"])
    if task == "math":
        return MATH_PROMPT.format(problem=record["problem"])
    tests = "\n".join(record["test_list"])
    return MBPP_PROMPT.format(text=record["text"], tests=tests)


def build_target(task: str, record: Mapping[str, Any]) -> str:
    """The training target that follows :func:`build_prompt` (reference answer, solution or code)."""
    _check_task(task)
    if task == "gsm8k":
        return record["answer"]
    if task == "math":
        return record["solution"]
    return f"{record['code'].strip()}\n{MBPP_END}"


# Where generation stops for each task: the start of the next few-shot style block, or MBPP's end marker.
STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("\nQuestion:",),
    "math": ("\nProblem:",),
    "mbpp": (MBPP_END,),
}
