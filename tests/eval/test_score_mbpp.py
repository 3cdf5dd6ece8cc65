"""MBPP scoring: reference programs pass, code extraction, malformed completions score 0."""

from __future__ import annotations

import pytest

from axolotl_soka.eval import score
from axolotl_soka.eval.sandbox import isolation_error
from axolotl_soka.eval.score_mbpp import extract_code
from axolotl_soka.eval.scoring import score_many
from axolotl_soka.prompts import build_target

# The reference programs and the ones here are trusted: without bwrap they run with only the rlimits.
UNSAFE = isolation_error() is not None


def test_reference_programs_pass(mbpp_test: list[dict]) -> None:
    """All 500 test-split reference programs, 4 sandboxed processes at a time; at least 99% pass.

    The limit per program is a hang guard, far above what any needs: task 123 takes about 5 s alone on a
    2-core CPU, half the default 10 s, so a loaded host could otherwise time it out."""
    completions = [build_target("mbpp", r) for r in mbpp_test]
    verdicts = score_many("mbpp", completions, mbpp_test, workers=4, timeout=60, unsafe_exec=UNSAFE)
    failed = [(r["task_id"], v.error) for r, v in zip(mbpp_test, verdicts, strict=True) if not v.correct]
    assert len(mbpp_test) == 500
    assert len(failed) <= 5, failed


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("def f():\n    return 1\n[DONE]\nmore text", "def f():\n    return 1"),
        ("```python\ndef f():\n    return 1\n```\n[DONE]", "def f():\n    return 1"),
        ("Here:\n```\ndef f(): return 1\n```", "def f(): return 1"),
        ("```python\ndef f(): return 1", "def f(): return 1"),
        ("[BEGIN]\ndef f(): return 1\n[DONE]", "def f(): return 1"),
        ("", ""),
    ],
)
def test_extract_code(completion: str, expected: str) -> None:
    assert extract_code(completion) == expected


RECORD = {"task_id": 0, "text": "t", "test_setup_code": "", "test_list": ["assert f() == 1"]}


def test_correct_and_wrong_programs() -> None:
    assert score("mbpp", "def f():\n    return 1\n[DONE]", RECORD, unsafe_exec=UNSAFE).correct
    wrong = score("mbpp", "def f():\n    return 2\n[DONE]", RECORD, unsafe_exec=UNSAFE)
    assert not wrong.correct
    assert "AssertionError" in (wrong.error or "")


def test_setup_code_runs_before_the_asserts() -> None:
    record = {
        **RECORD,
        "test_setup_code": "import math\nONE = math.floor(1.5)",
        "test_list": ["assert f() == ONE"],
    }
    assert score("mbpp", "def f():\n    return 1", record, unsafe_exec=UNSAFE).correct


@pytest.mark.parametrize(
    "completion",
    ["", None, "[DONE]", "```", "```python\n```", "def f(:\n", "\x00\x01", "🙂" * 50, "assert False"],
)
def test_malformed_completions_score_zero(completion: object) -> None:
    verdict = score("mbpp", completion, RECORD, unsafe_exec=UNSAFE)  # type: ignore[arg-type]
    assert verdict.correct is False
    assert verdict.error
