"""GSM8K scoring: exact match of the final number.

The answer is the text after the last ``####`` when present, else the last number in the completion.
Both sides are normalised (thousands separators, ``$``, trailing period, trailing ``.0``/``.00``) and
compared as strings, as in the reference GSM8K evaluation.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?[$]?\s*\d[\d,]*(?:\.\d+)?|-?\.\d+")
_MARKER = "####"


def normalize_number(text: str) -> str:
    """Canonical string for a number: no ``$``/commas/spaces, no trailing period or zero decimals."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    if s.startswith("-0") and re.fullmatch(r"-0+", s):
        s = "0"
    if re.fullmatch(r"-?\d+", s):
        sign = "-" if s.startswith("-") else ""
        s = sign + (s.lstrip("-").lstrip("0") or "0")
    return s


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return matches[-1] if matches else None


def extract_answer(completion: str) -> str | None:
    """The normalised final number of a completion, or ``None`` when there is none."""
    if not completion:
        return None
    if _MARKER in completion:
        tail = completion.rsplit(_MARKER, 1)[1]
        number = _last_number(tail.split("\n", 1)[0]) or _last_number(tail)
    else:
        number = _last_number(completion)
    return normalize_number(number) if number is not None else None


def reference_answer(answer: str) -> str:
    """The normalised reference number: the text after ``####`` in GSM8K's ``answer`` field."""
    if _MARKER not in answer:
        raise ValueError("GSM8K reference answer has no '####' marker")
    return normalize_number(answer.rsplit(_MARKER, 1)[1])


def is_correct(completion: str, answer: str) -> tuple[bool, str | None, str]:
    """``(correct, extracted, reference)`` for one completion and the record's ``answer`` field."""
    reference = reference_answer(answer)
    extracted = extract_answer(completion)
    return extracted is not None and extracted == reference, extracted, reference
