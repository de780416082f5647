"""The credit analyst's central references: gradient boosting and the WoE scorecard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from server.config import AuthorityConfig
from server.metrics import auc
from simulations.analysis.baselines import JoinedData, one_thread, train_central
from simulations.analysis.references import (
    GBDT,
    SCORECARD,
    ScorecardParams,
    Split,
    central_references,
    fit_scorecard,
    fit_sign_constrained_logistic,
    joined_references,
    monotone_bins,
)


def _split(n: int, rng: np.random.Generator) -> Split:
    order = rng.permutation(n)
    return Split(np.sort(order[: n * 6 // 10]), np.sort(order[n * 6 // 10 : n * 8 // 10]),
                 np.sort(order[n * 8 // 10 :]))


def _xor(n: int = 4000, seed: int = 0) -> JoinedData:
    """Default when exactly one of two features, held by different silos, is positive: no sum
    of per-silo parts can express it."""
    rng = np.random.default_rng(seed)
    xs = {"payments": rng.normal(size=(n, 3)).astype(np.float32),
          "social": rng.normal(size=(n, 2)).astype(np.float32)}
    xor = (xs["payments"][:, 0] > 0) != (xs["social"][:, 0] > 0)
    y = (rng.random(n) < np.where(xor, 0.8, 0.1)).astype(np.float64)
    split = pd.Series(rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2]))
    return JoinedData(xs=xs, y=y, split=split, ids=np.empty(0, dtype=object))


def test_gradient_boosting_learns_the_interaction_the_summed_mlp_cannot():
    data = _xor()
    with one_thread():
        mlp = train_central(data, ("payments", "social"), AuthorityConfig())
    refs = joined_references(data, seed=0)
    assert mlp.metrics["auc"] < 0.6
    # The best possible test AUC here is about 0.85 (0.8 against 0.1 in equal halves).
    assert refs[GBDT].metrics["auc"] > 0.8
    assert refs[GBDT].metrics["auc"] > mlp.metrics["auc"] + 0.2
    assert refs[GBDT].history[0]["rounds"] >= 1
    assert refs[GBDT].metrics.keys() == mlp.metrics.keys()  # the same metric functions


def _additive(n: int = 8000, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risk rising in column 0, falling in column 1, higher for the flag in column 2; column 3
    is noise. Returns features, labels and the true probabilities."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.normal(size=n), rng.exponential(size=n),
                         (rng.random(n) < 0.3).astype(np.float64), rng.normal(size=n)])
    p = 1 / (1 + np.exp(-(-2.0 + 1.2 * x[:, 0] - 0.9 * x[:, 1] + 0.8 * x[:, 2])))
    return x, (rng.random(n) < p).astype(np.float64), p


def test_scorecard_woe_is_monotone_and_coefficients_have_the_woe_sign():
    x, y, _ = _additive()
    card = fit_scorecard(x, y)
    for bins in card.bins:
        step = np.diff(bins.woe)
        assert (step >= -1e-12).all() or (step <= 1e-12).all()
    # More defaults as column 0 grows: its WoE (share of goods over share of bads) falls.
    assert (np.diff(card.bins[0].woe) <= 0).all()
    assert (np.diff(card.bins[1].woe) >= 0).all()
    assert min(len(card.bins[0].woe), len(card.bins[1].woe)) >= 5
    assert len(card.bins[2].woe) == 2  # the flag's two values, each its own bin
    assert (card.coef <= 0).all()
    assert (card.coef[:3] < -0.5).all()  # each informative feature carries weight


def test_scorecard_is_close_to_the_truth_on_an_additive_monotone_target():
    x, y, p = _additive()
    split = _split(len(y), np.random.default_rng(2))
    refs = central_references(x, y, split, seed=0)
    best = auc(y[split.test], p[split.test])
    assert refs[SCORECARD].metrics["auc"] > best - 0.02
    assert refs[GBDT].metrics["auc"] > best - 0.03


def test_the_same_seed_gives_the_same_references():
    x, y, _ = _additive(3000)
    split = _split(len(y), np.random.default_rng(3))
    first, again = central_references(x, y, split, 5), central_references(x, y, split, 5)
    for name in (GBDT, SCORECARD):
        assert first[name].metrics == again[name].metrics
        assert first[name].history == again[name].history


def test_the_sign_constrained_regression_is_the_bounded_maximum_likelihood():
    """Known answer from scipy's L-BFGS-B on the same bounds, and the KKT conditions: zero
    gradient on the free coefficients, a gradient pushing past the bound on the others."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(3000, 4))
    # Columns 0 and 1 lower the risk as they grow (allowed); 2 raises it, so its coefficient
    # must stop at the bound 0; 3 is noise.
    t = -1.5 - 1.0 * z[:, 0] - 0.4 * z[:, 1] + 0.7 * z[:, 2]
    y = (rng.random(3000) < 1 / (1 + np.exp(-t))).astype(np.float64)
    coef, intercept = fit_sign_constrained_logistic(z, y)
    X = np.column_stack([z, np.ones(len(z))])

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = X @ w
        return (float(np.mean(np.logaddexp(0.0, s) - y * s)),
                X.T @ (1 / (1 + np.exp(-s)) - y) / len(y))

    ref = minimize(loss, np.zeros(5), jac=True, method="L-BFGS-B",
                   bounds=[(None, 0.0)] * 4 + [(None, None)],
                   options={"ftol": 1e-15, "gtol": 1e-10})
    ours = np.append(coef, intercept)
    assert loss(ours)[0] <= ref.fun + 1e-10
    np.testing.assert_allclose(ours, ref.x, atol=1e-4)
    assert coef[2] == 0.0
    grad = loss(ours)[1]
    free = np.append(coef < 0, True)
    assert np.abs(grad[free]).max() < 1e-6
    assert (grad[~free] < 0).all()  # the likelihood would like a positive coefficient


def test_a_constant_feature_gets_one_bin_and_no_weight():
    x, y, _ = _additive(2000)
    x[:, 3] = 7.0
    card = fit_scorecard(x, y)
    assert card.bins[3].woe.tolist() == [0.0]
    assert card.coef[3] == 0.0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(20, 600), levels=st.integers(1, 40),
       bins=st.integers(2, 12), share=st.floats(0.0, 0.3))
@example(seed=27, n=29, levels=9, bins=8, share=0.0)  # two equal rates: WoE equal to rounding
@example(seed=19, n=20, levels=19, bins=10, share=0.0)  # tied quantile cuts: an empty bin
def test_binning_always_gives_monotone_finite_woe_over_ordered_cuts(
        seed: int, n: int, levels: int, bins: int, share: float):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, levels, size=n) * rng.normal()  # ties, a random scale and sign
    y = (rng.random(n) < rng.random()).astype(np.float64)
    fb = monotone_bins(v, y, ScorecardParams(max_bins=bins, min_bin_share=share))
    assert len(fb.woe) == len(fb.cuts) + 1 <= bins + 1
    assert np.isfinite(fb.woe).all()
    assert (np.diff(fb.cuts) > 0).all()
    # Two neighbours with the same default rate have the same WoE up to rounding (found by
    # this test: a step of 1.1e-16 among falling ones); monotone means up to that.
    step = np.diff(fb.woe)
    assert (step >= -1e-12).all() or (step <= 1e-12).all()
    counts = np.bincount(np.searchsorted(fb.cuts, v, side="left"), minlength=len(fb.woe))
    assert (counts > 0).all()  # no empty bin
    if len(fb.woe) > 1:
        assert counts.min() >= share * n


@pytest.mark.parametrize("name", [GBDT, SCORECARD])
def test_references_score_only_with_the_training_labels(name: str):
    """Changing validation and test labels must not change what was fitted: only the Platt
    calibration and early stopping may read validation labels, test labels never."""
    x, y, _ = _additive(3000)
    split = _split(len(y), np.random.default_rng(4))
    flipped = y.copy()
    flipped[split.test] = 1 - flipped[split.test]
    a = central_references(x, y, split, 0)[name]
    b = central_references(x, flipped, split, 0)[name]
    assert a.history == b.history  # the fit and its validation metrics are the same
    assert b.metrics["auc"] == pytest.approx(1 - a.metrics["auc"])
