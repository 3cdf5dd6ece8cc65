"""One entry point for scoring any task: :func:`score` and :func:`score_many`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from . import score_gsm8k, score_math, score_mbpp
from .sandbox import Limits


@dataclass(frozen=True)
class Verdict:
    """Score of one completion: ``correct`` plus what was compared and why it failed, if it did."""

    correct: bool
    extracted: str | None
    reference: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for ``results.json``."""
        return asdict(self)


def _text(completion: object) -> str:
    return completion if isinstance(completion, str) else ""


def score(
    task: str, completion: str, record: Mapping[str, Any], timeout: float = 10.0, unsafe_exec: bool = False
) -> Verdict:
    """Score one completion for ``task`` (``gsm8k``, ``math`` or ``mbpp``); never raises on bad output.

    ``timeout`` is the wall-clock limit in seconds for one MBPP program. MBPP programs run isolated by
    bubblewrap; without a working ``bwrap`` this raises :class:`.sandbox.SandboxUnavailableError`
    unless ``unsafe_exec`` allows running them with only in-process guards and resource limits.
    """
    completion = _text(completion)
    if task == "gsm8k":
        ok, extracted, reference = score_gsm8k.is_correct(completion, record["answer"])
        return Verdict(ok, extracted, reference, None if extracted is not None else "no number found")
    if task == "math":
        ok, extracted, reference = score_math.is_correct(completion, dict(record))
        return Verdict(ok, extracted, reference, None if extracted is not None else "no \\boxed answer")
    if task == "mbpp":
        ok, code, tests, error = score_mbpp.is_correct(
            completion, record, Limits(timeout_s=timeout), unsafe_exec
        )
        return Verdict(ok, code, tests, error)
    raise ValueError(f"unknown task {task!r}; allowed: gsm8k, math, mbpp")


def score_many(
    task: str,
    completions: Sequence[str],
    records: Sequence[Mapping[str, Any]],
    workers: int = 4,
    timeout: float = 10.0,
    unsafe_exec: bool = False,
) -> list[Verdict]:
    """Score many completions; MBPP programs run in parallel subprocesses (``workers`` at a time).

    ``timeout`` and ``unsafe_exec`` are as for :func:`score`.

    GSM8K and MATH are scored on the calling thread (``math-verify`` timeouts need the main thread).
    """
    if len(completions) != len(records):
        raise ValueError("completions and records differ in length")
    if task == "math":
        verdicts = score_math.is_correct_many([_text(c) for c in completions], [dict(r) for r in records])
        return [
            Verdict(ok, e, ref, None if e is not None else "no \\boxed answer") for ok, e, ref in verdicts
        ]
    if task != "mbpp" or workers <= 1:
        return [score(task, c, r, timeout, unsafe_exec) for c, r in zip(completions, records, strict=True)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(
                lambda cr: score(task, cr[0], cr[1], timeout, unsafe_exec),
                zip(completions, records, strict=True),
            )
        )
