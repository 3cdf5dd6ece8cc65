"""MATH scoring: boxed extraction, math-verify equivalence, references, malformed input, threads."""

from __future__ import annotations

import threading

import pytest

from axolotl_soka.eval import score
from axolotl_soka.eval.score_math import last_boxed, reference_answer
from axolotl_soka.eval.scoring import score_many


def test_reference_solutions_match_their_answers(math500: list[dict]) -> None:
    """At least 98% of MATH-500 solutions' last boxed expression is judged equal to the ``answer`` field."""
    verdicts = [score("math", r["solution"], r) for r in math500]
    assert len(math500) == 500
    assert sum(v.correct for v in verdicts) / len(verdicts) >= 0.98


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{x^{2}+\\sqrt{3}}", "x^{2}+\\sqrt{3}"),
        ("$\\boxed 5$", "5"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{unclosed", None),
        ("no box", None),
        ("", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "correct"),
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
        ("\\boxed{3}", "4", False),
        ("\\boxed{x+1}", "1+x", True),
        ("the answer is 4", "4", False),
    ],
)
def test_equivalence(completion: str, answer: str, correct: bool) -> None:
    assert score("math", completion, {"problem": "p", "answer": answer}).correct is correct


def test_reference_falls_back_to_solution_box() -> None:
    assert reference_answer({"solution": "so \\boxed{12}."}) == "12"
    with pytest.raises(ValueError):
        reference_answer({"solution": "nothing"})


@pytest.mark.parametrize(
    "completion",
    ["", None, "\\boxed{}", "\\boxed{", "\\boxed{\\frac{}{", "\\boxed{" + "(" * 500 + "}", "\x00"],
)
def test_malformed_completions_score_zero(completion: object) -> None:
    assert score("math", completion, {"problem": "p", "answer": "4"}).correct is False  # type: ignore[arg-type]


def test_scoring_off_the_main_thread() -> None:
    """math-verify's signal timeouts need the main thread; off it the check runs in a child process."""
    records = [{"problem": "p", "answer": "\\frac{1}{2}"}, {"problem": "p", "answer": "3"}]
    out: list = []
    worker = threading.Thread(
        target=lambda: out.append(score_many("math", ["\\boxed{0.5}", "\\boxed{4}"], records))
    )
    worker.start()
    worker.join(timeout=120)
    assert [v.correct for v in out[0]] == [True, False]
