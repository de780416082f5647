"""Population stability index: known answers, properties, and the errors a user meets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from clients.silo.drift import (
    EPSILON,
    DriftError,
    bin_counts,
    classify,
    drift_report,
    psi,
    psi_of_counts,
    quantile_edges,
)


def _by_hand(e_shares: list[float], a_shares: list[float]) -> float:
    return sum((a - e) * math.log(a / e) for e, a in zip(e_shares, a_shares, strict=True))


def test_known_answer_from_explicit_bin_shares():
    # Four bins with edges 1, 2, 3: the reference spreads evenly, the later cohort leans right.
    expected = np.repeat([0.5, 1.5, 2.5, 3.5], [25, 25, 25, 25])
    actual = np.repeat([0.5, 1.5, 2.5, 3.5], [10, 20, 30, 40])
    want = _by_hand([0.25] * 4, [0.1, 0.2, 0.3, 0.4])
    assert want == pytest.approx(0.228217, abs=1e-6)
    assert psi(expected, actual, edges=[1, 2, 3]) == pytest.approx(want, rel=1e-12)
    assert psi_of_counts([25] * 4, [10, 20, 30, 40]) == pytest.approx(want, rel=1e-12)


def test_known_answer_on_deciles_of_the_reference():
    expected = np.arange(1000.0)  # deciles: 100 values each
    assert len(quantile_edges(expected)) == 9
    per_decile = [50, 50, 100, 100, 100, 100, 100, 100, 150, 150]
    actual = np.concatenate([np.full(c, 100.0 * i + 50) for i, c in enumerate(per_decile)])
    want = _by_hand([0.1] * 10, [c / 1000 for c in per_decile])
    assert psi(expected, actual) == pytest.approx(want, rel=1e-12)


def test_an_empty_bin_is_floored_at_epsilon():
    want = (1.0 - 0.5) * math.log(1.0 / 0.5) + (EPSILON - 0.5) * math.log(EPSILON / 0.5)
    assert psi_of_counts([5, 5], [10, 0]) == pytest.approx(want, rel=1e-12)
    # An emptied decile alone already reads as a shift.
    assert classify(psi_of_counts([1] * 10, [0] + [1] * 9)) == "shift"


def test_values_outside_the_reference_range_land_in_the_outer_bins():
    counts = bin_counts([-1e9, 0.0, 5.0, 1e9], edges=[1.0, 2.0])
    assert counts.tolist() == [2, 0, 2]


def test_tied_values_merge_edges_instead_of_making_empty_bins():
    expected = np.array([0.0] * 800 + [1.0] * 100 + [2.0] * 100)  # mostly zero
    edges = quantile_edges(expected)
    assert len(edges) == 2  # three bins, none of them empty in the reference
    assert bin_counts(expected, edges).tolist() == [800, 100, 100]
    assert psi(expected, expected.copy()) == 0.0


def test_a_location_shift_is_detected():
    rng = np.random.default_rng(0)
    ref = rng.normal(600, 60, 20_000)
    assert classify(psi(ref, rng.normal(600, 60, 20_000))) == "stable"
    assert classify(psi(ref, rng.normal(630, 60, 20_000))) == "moderate"
    assert classify(psi(ref, rng.normal(680, 60, 20_000))) == "shift"


@pytest.mark.parametrize(
    ("value", "status"),
    [(0.0, "stable"), (0.0999, "stable"), (0.1, "moderate"), (0.2499, "moderate"),
     (0.25, "shift"), (3.0, "shift")],
)
def test_thresholds(value, status):
    assert classify(value) == status


@pytest.mark.parametrize("bad", [float("nan"), -0.01])
def test_classify_refuses_what_is_not_a_psi(bad):
    with pytest.raises(DriftError, match="number >= 0"):
        classify(bad)


def test_empty_input_is_named():
    with pytest.raises(DriftError, match="expected is empty"):
        psi([], [1.0])
    with pytest.raises(DriftError, match="actual is empty"):
        psi([1.0, 2.0], [])


def test_nan_is_named_with_its_count_and_the_fix():
    with pytest.raises(DriftError, match=r"actual holds 2 NaN value\(s\).*drop them"):
        psi([1.0, 2.0, 3.0], [1.0, np.nan, np.nan])


def test_other_bad_inputs_name_the_fix():
    with pytest.raises(DriftError, match="1-D"):
        psi(np.ones((3, 2)), np.ones(3))
    with pytest.raises(DriftError, match="infinite"):
        psi([1.0, np.inf], [1.0])
    with pytest.raises(DriftError, match="integer >= 2"):
        psi([1.0, 2.0], [1.0], bins=1)
    with pytest.raises(DriftError, match="strictly increasing"):
        psi([1.0, 2.0], [1.0], edges=[2.0, 1.0])
    with pytest.raises(DriftError, match="same length"):
        psi_of_counts([1, 2], [1, 2, 3])
    with pytest.raises(DriftError, match="sum to zero"):
        psi_of_counts([1, 2], [0, 0])


def test_drift_report_names_each_quantity_and_refuses_a_dropped_one():
    rng = np.random.default_rng(1)
    ref = {"score": rng.normal(600, 60, 5000), "payments": rng.normal(0, 20, 5000)}
    later = {"score": rng.normal(680, 60, 5000), "payments": rng.normal(0, 20, 5000)}
    report = drift_report(ref, later)
    assert list(report) == ["score", "payments"]
    assert report["score"]["status"] == "shift"
    assert report["payments"]["status"] == "stable"
    with pytest.raises(DriftError, match="actual lacks payments"):
        drift_report(ref, {"score": later["score"]})
    with pytest.raises(DriftError, match="score: actual holds 1 NaN"):
        drift_report({"score": ref["score"]}, {"score": np.array([np.nan, 1.0])})


# ---- properties ---------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
samples = st.lists(finite, min_size=1, max_size=200)
counts = st.lists(st.integers(0, 10_000), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(samples, samples, st.integers(2, 20))
def test_psi_is_never_negative(expected, actual, bins):
    assert psi(expected, actual, bins=bins) >= 0.0


@settings(max_examples=200, deadline=None)
@given(samples, st.integers(2, 20))
def test_a_cohort_against_itself_has_psi_zero(values, bins):
    assert psi(values, values, bins=bins) == 0.0
    assert psi(values, list(reversed(values)), bins=bins) == 0.0  # order does not matter


@settings(max_examples=200, deadline=None)
@given(samples, samples, st.lists(finite, min_size=0, max_size=12, unique=True))
def test_with_fixed_edges_psi_is_symmetric(expected, actual, edges):
    # PSI = KL(a||e) + KL(e||a) over the same bins: swapping the cohorts changes nothing. With
    # quantile edges from `expected` the bins themselves change on a swap, so only fixed edges
    # give exact symmetry.
    edges = sorted(edges)
    forward = psi(expected, actual, edges=edges)
    backward = psi(actual, expected, edges=edges)
    assert forward == pytest.approx(backward, rel=1e-12, abs=1e-15)


@settings(max_examples=200, deadline=None)
@given(counts, st.data())
def test_counts_form_is_symmetric_nonnegative_and_scale_free(expected, data):
    actual = data.draw(st.lists(st.integers(0, 10_000), min_size=len(expected),
                                max_size=len(expected)))
    if sum(expected) == 0 or sum(actual) == 0:
        return
    value = psi_of_counts(expected, actual)
    assert value >= 0.0
    assert psi_of_counts(actual, expected) == pytest.approx(value, rel=1e-12, abs=1e-15)
    # Shares, not counts, matter: ten times the people in the same proportions, same PSI.
    scaled = psi_of_counts([10 * c for c in expected], [10 * c for c in actual])
    assert scaled == pytest.approx(value, rel=1e-9, abs=1e-15)


integers = st.lists(st.integers(-1000, 1000).map(float), min_size=1, max_size=200)


@settings(max_examples=100, deadline=None)
@given(integers, integers, st.integers(-1000, 1000), st.sampled_from([0.25, 0.5, 2.0, 8.0]))
# Found in a suite run while the edges were interpolated: the edge -356 + 0.4 * 90 rounded to
# one side of -320 in these units and to the other after the map.
@example(expected=[0.0] * 13 + [-266.0] + [-356.0] * 4, actual=[-320.0], shift=16, scale=0.25)
def test_psi_does_not_depend_on_the_units(expected, actual, shift, scale):
    # An increasing affine map moves the quantile edges with the data: same bins, same PSI
    # (points vs. logits, CNY vs. thousands of CNY). Integer data and power-of-two scales keep
    # the arithmetic exact, and the edges are values of the data, so no value can cross an edge
    # through rounding.
    e, a = np.asarray(expected), np.asarray(actual)
    assert psi(e * scale + shift, a * scale + shift) == pytest.approx(psi(e, a), rel=1e-12)
