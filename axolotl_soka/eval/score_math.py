"""MATH scoring: the last ``\\boxed{...}`` of the completion, checked for equivalence with ``math-verify``.

Extraction follows the MATH reference code (``last_boxed_only_string``): the last ``\\boxed{...}`` or
``\\fbox{...}`` with nested braces, or ``\\boxed x`` without braces. Equivalence is decided by
Hugging Face's ``math-verify`` (``parse`` + ``verify``), not by a hand-written normaliser.

``math-verify`` bounds its own run time with ``signal.alarm``, which only works on the main thread.
On the main thread its timeouts are used; on any other thread the checks run in a child interpreter
(where they are on its main thread), which is killed if it overruns.
Any exception or timeout counts as "not equivalent".
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

TIMEOUT_SECONDS = 5
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``/``\\fbox{...}``/``\\boxed x`` in ``text``, or ``None``."""
    if not text:
        return None
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    rest = text[start + len(cmd) :]
    if rest.startswith(" "):
        # ``\boxed 5``: the argument is the next token, up to ``$`` or whitespace.
        token = rest.lstrip(" ").split("$", 1)[0].split()
        return token[0] if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


def reference_answer(record: dict) -> str:
    """MATH-500's ``answer`` field, else the last boxed expression of the ``solution``."""
    answer = record.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer)
    boxed = last_boxed(record.get("solution", ""))
    if boxed is None:
        raise ValueError("MATH record has neither an 'answer' nor a boxed answer in its 'solution'")
    return boxed


def _verify(reference: str, extracted: str, timeout: int | None) -> bool:
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    pred = parse(f"\\boxed{{{extracted}}}", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


# The child loads this file on its own (it has no package-relative imports), not the whole package.
_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("score_math", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
pairs = json.load(sys.stdin)
json.dump([module._verify_safe(r, e, t) for r, e, t in pairs], sys.stdout)
"""


def _verify_safe(reference: str, extracted: str, timeout: int | None) -> bool:
    try:
        return _verify(reference, extracted, timeout)
    except Exception:  # math-verify and sympy raise many kinds of errors on odd input
        return False


def _verify_in_child(pairs: Sequence[tuple[str, str]], timeout: int) -> list[bool]:
    """Verify ``pairs`` in a child interpreter, where math-verify runs on the main thread."""
    payload = json.dumps([(r, e, timeout) for r, e in pairs])
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(Path(__file__).resolve())],
            input=payload,
            capture_output=True,
            text=True,
            timeout=60 + 3 * timeout * len(pairs),
            check=True,
        )
        verdicts = json.loads(done.stdout)
    except (subprocess.SubprocessError, OSError, ValueError):
        return [False] * len(pairs)
    return [bool(v) for v in verdicts]


def equivalent_many(pairs: Sequence[tuple[str, str]], timeout: int = TIMEOUT_SECONDS) -> list[bool]:
    """:func:`equivalent` for many ``(reference, extracted)`` pairs; one child process off the main thread."""
    if not pairs:
        return []
    if threading.current_thread() is threading.main_thread():
        return [_verify_safe(r, e, timeout) for r, e in pairs]
    return _verify_in_child(pairs, timeout)


def equivalent(reference: str, extracted: str, timeout: int = TIMEOUT_SECONDS) -> bool:
    """Whether ``extracted`` equals ``reference`` according to ``math-verify`` (False on error/timeout)."""
    return equivalent_many([(reference, extracted)], timeout)[0]


def is_correct(completion: str, record: dict) -> tuple[bool, str | None, str]:
    """``(correct, extracted, reference)`` for one completion and its MATH record."""
    reference = reference_answer(record)
    extracted = last_boxed(completion)
    if extracted is None or not extracted.strip():
        return False, extracted, reference
    return equivalent(reference, extracted), extracted, reference


def is_correct_many(
    completions: Sequence[str], records: Sequence[dict]
) -> list[tuple[bool, str | None, str]]:
    """:func:`is_correct` for many completions, with one child process when off the main thread."""
    refs = [reference_answer(r) for r in records]
    extracted = [last_boxed(c) for c in completions]
    todo = [i for i, e in enumerate(extracted) if e is not None and e.strip()]
    verdicts = dict(zip(todo, equivalent_many([(refs[i], extracted[i]) for i in todo]), strict=True))
    return [(verdicts.get(i, False), extracted[i], refs[i]) for i in range(len(records))]
