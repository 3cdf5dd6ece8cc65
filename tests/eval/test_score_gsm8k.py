"""GSM8K scoring: every shipped reference solution scores 1; normalisation; malformed completions."""

from __future__ import annotations

import pytest

from axolotl_soka.eval import score
from axolotl_soka.eval.score_gsm8k import extract_answer, normalize_number, reference_answer


def test_every_reference_solution_scores_one(gsm8k_test: list[dict]) -> None:
    verdicts = [score("gsm8k", r["answer"], r) for r in gsm8k_test]
    wrong = [(v.extracted, v.reference) for v in verdicts if not v.correct]
    assert len(gsm8k_test) == 300
    assert not wrong


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,000", "1000"),
        ("$18", "18"),
        ("18.", "18"),
        ("18.00", "18"),
        ("7.0", "7"),
        ("-3", "-3"),
        ("0.5", "0.5"),
    ],
)
def test_normalize_number(text: str, expected: str) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### $1,250.00.", "1250"),
        ("The answer is 42.", "42"),
        ("First 3, then 5, so the total is 1,234.", "1234"),
        ("#### 7\nQuestion: 99", "7"),
        ("It is -4 degrees", "-4"),
    ],
)
def test_extract_answer(completion: str, expected: str) -> None:
    assert extract_answer(completion) == expected


def test_reference_answer_needs_marker() -> None:
    assert reference_answer("so 5\n#### 5") == "5"
    with pytest.raises(ValueError, match="####"):
        reference_answer("no marker")


@pytest.mark.parametrize(
    "completion", ["", "no numbers here", "####", "#### ", "\x00\x01", None, 12, "#### x"]
)
def test_malformed_completions_score_zero(completion: object, gsm8k_test: list[dict]) -> None:
    verdict = score("gsm8k", completion, gsm8k_test[0])  # type: ignore[arg-type]
    assert verdict.correct is False
    assert verdict.reference == "18"
