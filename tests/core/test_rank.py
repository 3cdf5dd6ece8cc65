"""Rank selection from a KPSVD spectrum: energy threshold, elbow, combination and clipping."""

import math

import numpy as np
import pytest
import torch
from kneed import KneeLocator

from axolotl_soka.kron import (
    COMBINE_MODES,
    ELBOW_MODES,
    check_selection_args,
    elbow_curvature,
    elbow_kneedle,
    energy_rank,
    energy_shares,
    select_rank,
)
from axolotl_soka.kron.rank import elbow_rank

STEP = torch.tensor([10.0, 10.0, 10.0] + [0.1] * 20)  # three strong terms, then a flat floor


def sqrt_spectrum(energies, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([math.sqrt(e) for e in energies], dtype=dtype)


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [(0.3, 1), (0.5, 1), (0.5000001, 2), (0.8, 2), (0.80001, 3), (0.95, 3), (0.9500001, 4), (1.0, 4)],
)
def test_energy_rank_boundaries_float64(threshold, expected):
    s = sqrt_spectrum([50, 30, 15, 5])  # shares 0.5, 0.8, 0.95, 1.0 of a total of 100
    assert energy_rank(s, 100.0, threshold) == expected


@pytest.mark.parametrize(
    ("threshold", "expected"), [(0.64, 1), (0.6400001, 2), (0.8, 2), (0.96, 3), (0.9600001, 4), (1.0, 4)]
)
def test_energy_rank_boundaries_exact_fp32(threshold, expected):
    s = torch.tensor([8.0, 4.0, 4.0, 2.0])  # energies 64, 16, 16, 4: exact in fp32
    assert energy_rank(s, 100.0, threshold) == expected


def test_energy_shares_values():
    s = torch.tensor([8.0, 4.0, 4.0, 2.0])
    assert energy_shares(s, 100.0).tolist() == pytest.approx([0.64, 0.80, 0.96, 1.00], abs=1e-12)
    assert energy_shares(s, 0.0).tolist() == [1.0, 1.0, 1.0, 1.0]  # a zero weight: nothing to keep


def test_energy_rank_none_beyond_the_computed_head():
    head = torch.tensor([8.0, 4.0])  # 80 of a total energy of 100 computed
    assert energy_rank(head, 100.0, 0.8) == 2
    assert energy_rank(head, 100.0, 0.81) is None
    assert energy_rank(head, 100.0, 1.0) is None


def test_step_spectrum_elbow_is_three():
    assert elbow_kneedle(STEP, 64) == 3
    assert elbow_curvature(STEP, 64) == 3
    assert elbow_kneedle(STEP, 23) == 3
    assert elbow_curvature(STEP, 23) == 3


@pytest.mark.parametrize(
    ("name", "curve", "expected"),
    [
        ("exp(-k/5)", lambda k: np.exp(-k / 5), 10),
        ("exp(-k/10)", lambda k: np.exp(-k / 10), 14),
        ("1/k", lambda k: 1 / k, 5),
        ("1/k^2", lambda k: 1 / k**2, 3),
    ],
)
def test_kneedle_agrees_with_kneed(name, curve, expected):
    window = 40
    k = np.arange(1, window + 1)  # σ_k indexed from 1
    sigma = curve(k.astype(np.float64))
    knee = KneeLocator(k, sigma, curve="convex", direction="decreasing").knee
    # kneed returns the 1-based index k* of the elbow point; ours counts the terms before it: k* − 1
    assert elbow_kneedle(torch.tensor(sigma), window) == knee - 1 == expected
    # and in fp32, and when the spectrum is longer than the window
    longer = torch.tensor(curve(np.arange(1, 2 * window + 1, dtype=np.float64)), dtype=torch.float32)
    assert elbow_kneedle(longer, window) == knee - 1


@pytest.mark.parametrize("elbow", [elbow_kneedle, elbow_curvature])
def test_linear_spectrum_has_no_elbow(elbow):
    linear = torch.linspace(10.0, 1.0, 20, dtype=torch.float64)
    assert elbow(linear, 20) == 20
    assert elbow(linear, 8) == 8
    assert elbow(linear, 64) == 20  # window larger than the spectrum: all of it


def test_concave_and_flat_spectra_have_no_elbow():
    concave = torch.tensor([10.0 - 0.02 * k**2 for k in range(20)], dtype=torch.float64)
    assert elbow_kneedle(concave, 20) == 20
    flat = torch.ones(10)
    assert elbow_kneedle(flat, 10) == 10
    assert elbow_curvature(flat, 10) == 10


def test_too_short_window_returns_it():
    assert elbow_kneedle(STEP, 2) == 2
    assert elbow_curvature(STEP, 2) == 2


def test_elbow_rank_dispatch():
    assert elbow_rank(STEP, "kneedle", 64) == 3
    assert elbow_rank(STEP, "curvature", 64) == 3
    assert elbow_rank(STEP, "none", 64) is None
    with pytest.raises(ValueError, match="kneedle, curvature, none"):
        elbow_rank(STEP, "knee", 64)


# STEP has energies 100, 100, 100, 0.01×20 (total 300.2): τ = 0.5 → energy rank 2, elbow rank 3
@pytest.mark.parametrize(
    ("combine", "rank", "decided_by"),
    [("min", 2, "energy"), ("max", 3, "elbow"), ("energy", 2, "energy"), ("elbow", 3, "elbow")],
)
def test_combine_modes(combine, rank, decided_by):
    total = float(STEP.double().pow(2).sum())
    decision = select_rank(STEP, total, energy_threshold=0.5, combine=combine, max_rank=8)
    assert (decision.rank, decision.decided_by) == (rank, decided_by)
    assert (decision.energy_rank, decision.elbow_rank) == (2, 3)
    assert decision.energy_kept == pytest.approx(100.0 * rank / 300.2, rel=1e-6)
    assert decision.total_energy == total
    assert decision.spectrum == pytest.approx(STEP.tolist())


def test_combine_min_when_elbow_is_smaller():
    total = float(STEP.double().pow(2).sum())
    # 300/300.2 = 0.999334 < τ ≤ 300.01/300.2 = 0.999367
    decision = select_rank(STEP, total, energy_threshold=0.99935, combine="min", max_rank=8)
    assert decision.energy_rank == 4
    assert (decision.rank, decision.decided_by) == (3, "elbow")
    decision = select_rank(STEP, total, energy_threshold=0.99935, combine="max", max_rank=8)
    assert (decision.rank, decision.decided_by) == (4, "energy")


def test_combine_tie_has_the_common_rank():
    total = float(STEP.double().pow(2).sum())
    for combine in ("min", "max"):
        decision = select_rank(STEP, total, energy_threshold=0.9, combine=combine, max_rank=8)
        assert decision.rank == 3
        assert decision.decided_by in {"energy", "elbow"}
    assert select_rank(STEP, total, energy_threshold=0.9, combine="min").decided_by == "energy"


def test_no_elbow_mode_uses_energy_only():
    total = float(STEP.double().pow(2).sum())
    decision = select_rank(STEP, total, energy_threshold=0.5, elbow_mode="none", combine="min")
    assert (decision.rank, decision.decided_by, decision.elbow_rank) == (2, "energy", None)
    decision = select_rank(STEP, total, energy_threshold=0.5, elbow_mode="none", combine="max")
    assert (decision.rank, decision.decided_by) == (2, "energy")


def test_clipped_to_max_rank():
    s = torch.linspace(10.0, 1.0, 30)  # flat-ish: energy rank well above 4, no elbow (30)
    total = float(s.double().pow(2).sum())
    decision = select_rank(s, total, energy_threshold=0.9, max_rank=4)
    assert decision.energy_rank > 4
    assert (decision.rank, decision.decided_by) == (4, "max_rank")
    assert decision.energy_kept == pytest.approx(float(s[:4].double().pow(2).sum()) / total, rel=1e-9)


def test_clipped_to_min_rank():
    s = torch.tensor([100.0, 1.0, 0.5, 0.25, 0.1])
    total = float(s.double().pow(2).sum())
    decision = select_rank(s, total, energy_threshold=0.9, min_rank=3, max_rank=8)
    assert decision.energy_rank == 1
    assert (decision.rank, decision.decided_by) == (3, "min_rank")


def test_clipped_to_the_computed_spectrum():
    head = torch.tensor([8.0, 4.0])  # the energy rank lies beyond the head
    decision = select_rank(head, 100.0, energy_threshold=0.9, combine="energy", max_rank=8)
    assert decision.energy_rank is None
    assert (decision.rank, decision.decided_by) == (2, "spectrum")
    decision = select_rank(head, 100.0, energy_threshold=0.5, min_rank=5, max_rank=8)
    assert (decision.rank, decision.decided_by) == (2, "spectrum")


def test_min_rank_zero_allows_rank_zero_only_through_criteria():
    s = torch.tensor([100.0, 1.0, 0.5])
    decision = select_rank(s, float(s.pow(2).sum()), energy_threshold=0.5, min_rank=0, max_rank=4)
    assert decision.rank == 1  # the energy criterion never asks for zero terms
    assert decision.to_dict()["rank"] == 1


def test_spectrum_evidence_is_truncated_to_the_window():
    s = torch.linspace(10.0, 0.1, 100)
    decision = select_rank(s, float(s.double().pow(2).sum()), search_window=10, max_rank=4)
    assert len(decision.spectrum) == 10
    assert decision.spectrum == pytest.approx(s[:10].tolist())


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"energy_threshold": 0.0}, ["energy_threshold", "(0, 1]", "0.0"]),
        ({"energy_threshold": 1.5}, ["energy_threshold", "(0, 1]", "1.5"]),
        ({"energy_threshold": -0.2}, ["energy_threshold", "(0, 1]"]),
        ({"min_rank": -1}, ["min_rank", "non-negative integer", "-1"]),
        ({"max_rank": -3}, ["max_rank", "non-negative integer", "-3"]),
        ({"max_rank": 0, "min_rank": 0}, ["max_rank", "at least 1"]),
        ({"min_rank": 1.5}, ["min_rank", "non-negative integer", "1.5"]),
        ({"min_rank": True}, ["min_rank", "non-negative integer"]),
        ({"min_rank": 5, "max_rank": 2}, ["min_rank (5)", "max_rank (2)", "must not exceed"]),
        ({"elbow_mode": "knee"}, ["elbow_mode", "'knee'", ", ".join(ELBOW_MODES)]),
        ({"combine": "mean"}, ["rank_combine", "'mean'", ", ".join(COMBINE_MODES)]),
        (
            {"combine": "elbow", "elbow_mode": "none"},
            ["rank_combine 'elbow'", "elbow_mode", "kneedle, curvature"],
        ),
        ({"search_window": 2}, ["search_window", "at least 3", "2"]),
        ({"search_window": 3.0}, ["search_window", "integer"]),
    ],
)
def test_bad_arguments_raise_with_clear_messages(kwargs, fragments):
    with pytest.raises(ValueError) as excinfo:
        select_rank(STEP, 300.2, **kwargs)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_check_selection_args_accepts_edges():
    check_selection_args(1.0, "none", "energy", 0, 1, 3)
    check_selection_args(1e-9, "curvature", "elbow", 8, 8, 64)
