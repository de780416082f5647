"""Reason codes: the catalogue, attribution known answers, exactness, speed, and top reasons."""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clients.protocol.reasons import (
    CATALOGUE,
    ReasonError,
    attribution_points,
    feature_attributions,
    feature_groups,
    median_reference,
    missing_from_catalogue,
    points_from_logit,
    points_vs_reference,
    reason_codes,
    reason_text,
    score_factor,
    top_reasons,
    top_reasons_matrix,
)
from clients.protocol.schema import SILO_FEATURES, SILOS

ROOT = Path(__file__).resolve().parents[1]
CJK = re.compile(r"[\u4e00-\u9fff]")
METHODS = ["path", "sequential", "marginal"]


# ---- catalogue ---------------------------------------------------------------------------------

@pytest.mark.parametrize("silo", SILOS)
def test_every_feature_of_every_silo_has_a_bilingual_entry(silo):
    for feature in SILO_FEATURES[silo]:
        text = CATALOGUE[silo][feature.name]
        for english in (text.label_en, text.tip_en):
            assert english.strip()
            assert not CJK.search(english), f"{silo}.{feature.name}: English text is Chinese"
        for chinese in (text.label_zh, text.tip_zh):
            assert CJK.search(chinese), f"{silo}.{feature.name}: no Chinese text"
    assert missing_from_catalogue() == []


def test_the_catalogue_holds_no_feature_the_schema_lacks():
    assert {s: set(c) for s, c in CATALOGUE.items()} == {
        s: {f.name for f in feats} for s, feats in SILO_FEATURES.items()}


def test_the_generator_writes_no_feature_without_a_tip():
    from simulations.data.label_model import LABEL_TERMS

    for silo, terms in LABEL_TERMS.items():
        for column, _, _ in terms:
            assert column in CATALOGUE[silo]


def test_unknown_features_get_a_generic_text_that_points_to_disputes():
    text = reason_text("profile", "PAY_AMT1")
    assert text.label_en == "PAY_AMT1"
    assert "dispute" in text.tip_en
    assert "申诉" in text.tip_zh


def test_no_torch_server_or_simulations_at_import():
    code = ("import sys, clients.protocol.reasons; bad = [m for m in sys.modules "
            "if m == 'torch' or m.startswith(('server', 'simulations'))]; assert not bad, bad; "
            "print(clients.protocol.reasons.__file__)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ROOT / "clients" / "protocol" / "reasons.py")


# ---- attributions: known answers ---------------------------------------------------------------

def _linear(w: np.ndarray, b: float = 0.3):
    return lambda a: a @ w + b


@pytest.mark.parametrize("method", METHODS)
def test_linear_model_attributions_are_w_times_the_difference(method):
    rng = np.random.default_rng(0)
    w = rng.normal(size=6)
    x, ref = rng.normal(size=(50, 6)), rng.normal(size=6)
    got = feature_attributions(_linear(w), x, ref, method=method)
    np.testing.assert_allclose(got, w * (x - ref), rtol=1e-12, atol=1e-12)


def test_groups_switch_a_features_columns_together():
    columns = ["balance", "spend_level", "status=1", "status=2", "balance__missing"]
    groups = feature_groups(columns, ["balance", "spend_level", "status"])
    assert [g.tolist() for g in groups] == [[0, 4], [1], [2, 3]]
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    x, ref = np.array([[1.0, 1.0, 1.0, 0.0, 1.0]]), np.zeros(5)
    got = feature_attributions(_linear(w), x, ref, groups=groups)
    np.testing.assert_allclose(got, [[1.0 + 5.0, 2.0, 3.0]])


def test_feature_groups_name_the_column_they_cannot_place():
    with pytest.raises(ReasonError, match="'mystery' belongs to no feature"):
        feature_groups(["balance", "mystery"], ["balance"])
    with pytest.raises(ReasonError, match="spend_level have no model input"):
        feature_groups(["balance"], ["balance", "spend_level"])


def _mlp(rng: np.random.Generator, d: int, hidden: tuple[int, ...] = (16, 8)):
    sizes = (d, *hidden, 1)
    layers = [(rng.normal(size=(i, o)) / math.sqrt(i), rng.normal(size=o) * 0.1)
              for i, o in itertools.pairwise(sizes)]

    def f(a: np.ndarray) -> np.ndarray:
        h = a
        for W, b in layers[:-1]:
            h = np.tanh(h @ W + b)
        W, b = layers[-1]
        return (h @ W + b)[:, 0]

    return f


@pytest.mark.parametrize("method", ["path", "sequential"])
def test_attributions_add_up_exactly_for_an_mlp(method):
    rng = np.random.default_rng(1)
    f = _mlp(rng, 7)
    x = rng.normal(size=(300, 7))
    ref = median_reference(x)
    got = feature_attributions(f, x, ref, method=method)
    np.testing.assert_allclose(got.sum(axis=1), f(x) - f(ref[None, :]), rtol=0, atol=1e-12)


def test_marginal_attributions_do_not_add_up_when_features_interact():
    rng = np.random.default_rng(1)
    f = _mlp(rng, 7)
    x = rng.normal(size=(300, 7))
    ref = median_reference(x)
    got = feature_attributions(f, x, ref, method="marginal")
    assert np.abs(got.sum(axis=1) - (f(x) - f(ref[None, :]))).max() > 1e-3


def _shapley(f, x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Baseline Shapley by brute force over all 2^d coalitions (one person)."""
    d = len(x)
    phi = np.zeros(d)
    for j in range(d):
        others = [i for i in range(d) if i != j]
        for size in range(d):
            for coalition in itertools.combinations(others, size):
                z = ref.copy()
                z[list(coalition)] = x[list(coalition)]
                without = f(z[None, :])[0]
                z[j] = x[j]
                weight = math.factorial(size) * math.factorial(d - size - 1) / math.factorial(d)
                phi[j] += weight * (f(z[None, :])[0] - without)
    return phi


def test_path_equals_shapley_when_interactions_are_at_most_pairwise():
    rng = np.random.default_rng(2)
    d = 5
    C = np.triu(rng.normal(size=(d, d)), 1)

    def f(a: np.ndarray) -> np.ndarray:
        u = np.sin(a) + a**2  # any per-feature transform
        return u.sum(axis=1) + np.einsum("ni,ij,nj->n", u, C, u)

    x, ref = rng.normal(size=(20, d)), rng.normal(size=d)
    got = feature_attributions(f, x, ref)
    want = np.array([_shapley(f, row, ref) for row in x])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # One fixed order is not: the interaction goes to whichever feature comes last.
    assert not np.allclose(feature_attributions(f, x, ref, method="sequential"), want)


def test_a_three_way_interaction_is_split_by_the_two_orders_only():
    # f = x0 x1 x2 from the origin: Shapley gives a third each; forward order credits x2, the
    # reverse order x0, so "path" gives (1/2, 0, 1/2): still exact in sum.
    def f(a):
        return a[:, 0] * a[:, 1] * a[:, 2]

    got = feature_attributions(f, np.array([[1.0, 1.0, 1.0]]), np.zeros(3))
    np.testing.assert_allclose(got, [[0.5, 0.0, 0.5]])
    seq = feature_attributions(f, np.array([[1.0, 1.0, 1.0]]), np.zeros(3),
                               method="sequential", order=[2, 0, 1])
    np.testing.assert_allclose(seq, [[0.0, 1.0, 0.0]])


def test_a_reference_per_person_is_allowed():
    w = np.array([1.0, -2.0])
    x = np.array([[1.0, 1.0], [2.0, 0.0]])
    ref = np.array([[0.0, 0.0], [1.0, 1.0]])
    got = feature_attributions(_linear(w), x, ref)
    np.testing.assert_allclose(got, [[1.0, -2.0], [1.0, 2.0]])


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 6)),
                  elements=st.floats(-5, 5)),
       st.integers(1, 10_000), st.integers(0, 2**31))
def test_blocking_does_not_change_the_result(x, block, seed):
    rng = np.random.default_rng(seed)
    f = _mlp(rng, x.shape[1], (4,))
    ref = median_reference(x)
    whole = feature_attributions(f, x, ref)
    blocked = feature_attributions(f, x, ref, block_elements=block)
    np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(whole.sum(axis=1), f(x) - f(ref[None, :]), atol=1e-9)


def test_ten_thousand_people_in_well_under_a_second():
    rng = np.random.default_rng(3)
    n, d = 10_000, 10
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d)
    calls = []

    def f(a):
        calls.append(len(a))
        return a @ w

    ref = median_reference(x)
    start = time.perf_counter()
    got = feature_attributions(f, x, ref)
    elapsed = time.perf_counter() - start
    np.testing.assert_allclose(got, w * (x - ref), rtol=1e-4, atol=1e-4)
    assert sum(calls) == n * 2 * (d + 1)  # both walks, every state once
    assert len(calls) <= 2  # one model call per block, not per person
    assert elapsed < 1.0, f"{elapsed:.3f} s"
    start = time.perf_counter()
    feature_attributions(_mlp(rng, d), x, ref)
    assert time.perf_counter() - start < 2.0


def test_bad_inputs_name_the_fix():
    x = np.ones((3, 2))
    with pytest.raises(ReasonError, match="reference: shape"):
        feature_attributions(_linear(np.ones(2)), x, np.zeros(3))
    with pytest.raises(ReasonError, match="NaN or infinite"):
        feature_attributions(_linear(np.ones(2)), np.array([[np.nan, 1.0]]), np.zeros(2))
    with pytest.raises(ReasonError, match="one logit contribution per row"):
        feature_attributions(lambda a: a, x, np.zeros(2))
    with pytest.raises(ReasonError, match="cover every column"):
        feature_attributions(_linear(np.ones(2)), x, np.zeros(2), groups=[[0]])
    with pytest.raises(ReasonError, match="method="):
        feature_attributions(_linear(np.ones(2)), x, np.zeros(2), method="shap")
    with pytest.raises(ReasonError, match="permutation"):
        feature_attributions(_linear(np.ones(2)), x, np.zeros(2), method="sequential",
                             order=[0, 0])


# ---- points ------------------------------------------------------------------------------------

def test_points_use_pdo_over_ln2_and_fall_with_risk():
    factor = score_factor(50.0)
    assert factor == pytest.approx(72.1347520444)
    # One unit of log-odds more risk: PDO / ln 2 points fewer; ln 2 more: exactly PDO fewer.
    assert points_from_logit(1.0, factor) == pytest.approx(-factor)
    assert points_from_logit(math.log(2.0), factor) == pytest.approx(-50.0)
    assert points_vs_reference([0.5, -0.5], 0.0, factor, slope=2.0) == pytest.approx(
        [-factor, factor])
    with pytest.raises(ReasonError, match="pdo"):
        score_factor(0.0)


def test_feature_points_add_up_to_the_silos_points():
    rng = np.random.default_rng(4)
    f = _mlp(rng, 5)
    x = rng.normal(size=(100, 5))
    ref = median_reference(x)
    factor = score_factor(50.0)
    per_feature = attribution_points(f, x, ref, factor, slope=0.8)
    silo = points_vs_reference(f(x), f(ref[None, :]), factor, slope=0.8)
    np.testing.assert_allclose(per_feature.sum(axis=1), silo, atol=1e-9)


# ---- top reasons -------------------------------------------------------------------------------

def test_top_reasons_pick_the_largest_losses_and_skip_gains():
    points = {"a": -3.0, "b": 5.0, "c": -10.0, "d": 0.0, "e": -1.0, "f": -7.0, "g": -2.0}
    assert top_reasons(points) == [("c", -10.0), ("f", -7.0), ("a", -3.0), ("g", -2.0)]
    assert top_reasons(points, k=2) == [("c", -10.0), ("f", -7.0)]
    assert top_reasons({"b": 5.0, "d": 0.0}) == []
    assert top_reasons(points, min_loss=2.5) == [("c", -10.0), ("f", -7.0), ("a", -3.0)]
    assert top_reasons({"x": -1.0, "y": -1.0}) == [("x", -1.0), ("y", -1.0)]  # ties: order
    with pytest.raises(ReasonError, match="k=0"):
        top_reasons(points, k=0)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(1, 8)),
                  elements=st.floats(-100, 100).map(lambda v: round(v, 1))),
       st.integers(1, 6))
def test_the_matrix_form_matches_the_mapping_form(points, k):
    idx, val = top_reasons_matrix(points, k)
    assert idx.shape == val.shape == (len(points), k)
    for row, irow, vrow in zip(points, idx, val, strict=True):
        want = top_reasons(dict(enumerate(row.tolist())), k)
        got = [(int(i), float(v)) for i, v in zip(irow, vrow, strict=True) if i >= 0]
        assert got == want
        assert np.isnan(vrow[len(want):]).all()


def test_reason_codes_merge_silos_with_texts():
    points = {("payments", "overdue_count"): -42.0, ("device", "two_factor_on"): -12.5,
              ("social", "donations"): 3.0, ("device", "rebinding_count"): -20.0,
              ("payments", "balance"): -1.0, ("social", "violation_reports"): -8.0}
    codes = reason_codes(points)
    assert [(c.silo, c.feature) for c in codes] == [
        ("payments", "overdue_count"), ("device", "rebinding_count"),
        ("device", "two_factor_on"), ("social", "violation_reports")]
    assert codes[0].points == -42.0
    assert codes[0].label_zh == "存在逾期记录"
    assert "two-factor" in codes[2].tip_en
