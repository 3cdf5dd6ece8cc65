"""The error raised for bad command-line input (before any model is loaded)."""

from __future__ import annotations


class EvalInputError(ValueError):
    """Bad input to the evaluation command; the message names the flag and what is allowed."""
