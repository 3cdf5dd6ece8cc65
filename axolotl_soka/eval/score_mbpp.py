"""MBPP scoring: pass@1 by running the generated code against the task's asserts in a sandbox.

The code is the completion up to ``[DONE]`` with markdown fences removed; it runs in the sandbox,
followed by the task's ``test_setup_code`` and its ``test_list`` asserts, each run by the sandbox's
runner as a separate trusted statement (see :mod:`.sandbox`).
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


def build_tests(record: Mapping[str, Any]) -> list[str]:
    """The statements run after the code: the task's setup code (when there is one), then each assert."""
    setup = (record.get("test_setup_code") or "").replace("\r\n", "\n")
    return ([setup] if setup.strip() else []) + [t.replace("\r\n", "\n") for t in record["test_list"]]


def is_correct(
    completion: str, record: Mapping[str, Any], limits: Limits | None = None, unsafe_exec: bool = False
) -> tuple[bool, str, str, str | None]:
    """``(passed, extracted code, reference tests, error)`` for one completion and its MBPP record.

    Raises :class:`.sandbox.SandboxUnavailableError` without a working ``bwrap``, unless ``unsafe_exec``."""
    code = extract_code(completion)
    tests = "\n".join(record["test_list"])
    if not code.strip():
        return False, code, tests, "empty program"
    result = run_program(code, limits, tests=build_tests(record), unsafe_exec=unsafe_exec)
    return result.passed, code, tests, result.error
