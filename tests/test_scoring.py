"""Known answers for the score scale, tiers and calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.config import ScoreConfig
from server.privacy import CALIBRATION_STEPS
from server.scoring import TIERS, Platt, contribution_points, tier_counts, to_score, to_tier

CFG = ScoreConfig()  # 650 at 30:1, 50 points to double the odds


def test_base_odds_give_the_base_score():
    assert to_score(np.array([1 / 31]), CFG)[0] == 650


def test_doubling_the_odds_adds_pdo_points():
    p_base, p_double = 1 / 31, 1 / 61
    s = to_score(np.array([p_base, p_double, 1 / 121]), CFG)
    assert list(s) == [650, 700, 750]


def test_scores_are_clipped_to_300_850():
    assert list(to_score(np.array([0.999999, 1e-9, 0.0, 1.0]), CFG)) == [300, 850, 850, 300]


def test_scores_fall_as_risk_rises():
    p = np.linspace(0.001, 0.999, 500)
    assert (np.diff(to_score(p, CFG).astype(int)) <= 0).all()


@pytest.mark.parametrize(
    ("score", "tier"),
    [(300, "watch"), (409, "watch"), (410, "fair"), (559, "fair"), (560, "good"),
     (659, "good"), (660, "excellent"), (759, "excellent"), (760, "exceptional"),
     (850, "exceptional")],
)
def test_tier_bounds_are_inclusive(score, tier):
    assert TIERS[to_tier(np.array([score]))[0]].key == tier


def test_tier_counts_cover_every_tier():
    counts = tier_counts(to_tier(np.array([300, 420, 420, 800])))
    assert counts == {"watch": 1, "fair": 2, "good": 0, "excellent": 0, "exceptional": 1}


def test_platt_recovers_a_known_calibration():
    rng = np.random.default_rng(0)
    z = rng.normal(size=200_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 2.0)))).astype(float)
    cal = Platt.fit(z, y)
    assert cal.a == pytest.approx(0.5, abs=0.03)
    assert cal.b == pytest.approx(-2.0, abs=0.03)


def test_platt_stays_finite_on_extreme_logits():
    rng = np.random.default_rng(3)
    z = rng.normal(size=5000) * 1e6  # a diverged model's logits
    y = (rng.random(5000) < 0.1).astype(float)
    cal = Platt.fit(z, y)
    p = cal(z)
    assert np.isfinite([cal.a, cal.b]).all()
    assert np.isfinite(p).all()
    assert 0 < p.mean() < 1
    assert abs(p.mean() - y.mean()) < 0.02


def test_contribution_points_known_answer():
    """factor = 50 / ln 2 = 72.135; a = 2: a contribution 0.1 above the mean costs 14.43 points."""
    summary = {"mean": 0.0, "mad": 0.1, "q10": -0.2, "q50": 0.0, "q90": 0.1}
    pts = contribution_points(summary, Platt(a=2.0, b=0.0), ScoreConfig())
    assert pts["mean_abs_points"] == pytest.approx(14.427, abs=1e-3)
    assert pts["p10"] == pytest.approx(-14.427, abs=1e-3)  # from q90: more risk, fewer points
    assert pts["p50"] == pytest.approx(0.0)
    assert pts["p90"] == pytest.approx(28.854, abs=1e-3)


def test_calibration_never_reverses_the_ranking():
    """On a few validation people whose logits happen to rank backwards, the fitted slope
    stays positive, so released scores keep the model's order."""
    from server.scoring import MIN_SLOPE, Platt

    z = np.array([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0])
    y = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    calibrate = Platt.fit(z, y)
    assert calibrate.a == pytest.approx(MIN_SLOPE / z.std())
    assert np.all(np.diff(calibrate(z)) > 0)
    assert calibrate(z).mean() == pytest.approx(y.mean(), abs=0.01)


def test_a_private_calibration_is_applied_on_the_domain_it_was_fitted_on():
    """The private fit sees logits clipped to its declared domain. A diverged model's logits
    lie far outside it; extending the fitted line there scored most of a 22 % default-rate
    population as almost riskless (a UCI run at eps 1 put 28,005 of 30,000 in the top tier).
    Applied on its domain, with Newton steps of bounded length, it stays calibrated on average."""
    rng = np.random.default_rng(0)
    true = rng.normal(-1.5, 1.0, 20_000)
    y = (rng.random(true.size) < 1 / (1 + np.exp(-true))).astype(float)
    # A sound model, a diverged one (logits -30 .. 10), a flat one and a shifted one; the
    # run's noise and number of Newton steps (server/privacy.py) on 3,000 validation people.
    for z in (true, 8.0 * true, 0.3 * true - 2.0, true + 3.0):
        cal = Platt.fit_private(z[:3000], y[:3000], noise_multiplier=7.0,
                                steps=CALIBRATION_STEPS, expected_n=3000.0,
                                rng=np.random.default_rng(1))
        p = cal(z)
        assert p.mean() == pytest.approx(y.mean(), abs=0.02)
        assert (p < 0.01).mean() < 0.05  # nobody near riskless without evidence
        assert Platt.from_json(json.loads(json.dumps(cal.to_json()))) == cal
    assert Platt.from_json(Platt.fit(true, y).to_json()) == Platt.fit(true, y)
