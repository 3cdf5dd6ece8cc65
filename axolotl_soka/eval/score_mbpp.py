"""MBPP scoring: pass@1 by running the generated code against the task's asserts in a sandbox.

The code is the completion up to ``[DONE]`` with markdown fences removed; the program that runs is
that code, the task's ``test_setup_code`` and its ``test_list`` asserts (see :mod:`.sandbox`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..prompts import MBPP_END
from .sandbox import Limits, run_program

_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code of a completion: text before ``[DONE]``, inside a markdown fence when there is one."""
    text = (completion or "").split(MBPP_END, 1)[0]
    text = text.replace("[BEGIN]", "")
    if "```" in text:
        blocks = [b for b in _FENCE.findall(text) if b.strip()]
        text = blocks[0] if blocks else text.replace("```", "")
    return text.replace("\r\n", "\n").strip("\n")


def build_program(code: str, record: Mapping[str, Any]) -> str:
    """Code, then the task's setup code, then its asserts."""
    setup = (record.get("test_setup_code") or "").replace("\r\n", "\n")
    tests = "\n".join(record["test_list"])
    return f"{code}\n\n{setup}\n\n{tests}\n"


def is_correct(
    completion: str, record: Mapping[str, Any], limits: Limits | None = None
) -> tuple[bool, str, str, str | None]:
    """``(passed, extracted code, reference tests, error)`` for one completion and its MBPP record."""
    code = extract_code(completion)
    tests = "\n".join(record["test_list"])
    if not code.strip():
        return False, code, tests, "empty program"
    result = run_program(build_program(code, record), limits)
    return result.passed, code, tests, result.error
