"""Benchmark evaluation for GSM8K, MATH(-500) and MBPP.

Run ``python -m axolotl_soka.eval --task gsm8k|math|mbpp ...``; see :mod:`axolotl_soka.eval.cli`.
Scoring lives in ``score_gsm8k``, ``score_math`` and ``score_mbpp`` (the latter executes code through
``sandbox``); :class:`axolotl_soka.eval.callback.SampleEvalCallback` evaluates during training.
"""

from __future__ import annotations

from .scoring import Verdict, score

__all__ = ["Verdict", "score"]
