"""The one-run canary audit of the DP trees' own releases (simulations/analysis/tree_audit.py):
it replays the run's noising functions, certifies a clear bound without noise, stays below the
accounted epsilon with it, and catches a mechanism that noises less than it claims."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import norm

from clients.protocol.accounting import epsilon as accounted_epsilon
from server import gbdt_dp, gbdt_dp_guide, gbdt_dp_init, scorecard_dp
from server.ledger_lines import GaussianRelease
from simulations.analysis.canary_audit import log_likelihood_ratios
from simulations.analysis.tree_audit import (
    METHOD,
    TreeMechanism,
    counts_log_lr,
    from_ledger,
    replay_counts,
    replay_guides,
    replay_leaves,
    tree_audit,
)
from simulations.run.finish_vertical import model_mechanism

DELTA = 1e-5
# Calibrated with clients.protocol.accounting.calibrate_sigma to epsilon 1 at DELTA (PRV):
# 10 trees at q 0.5, and 10 histogram releases on everyone.
LEAVES_EPS1 = 6.25
GUIDES_EPS1 = 11.953125


def test_replays_without_noise_show_exactly_the_included_canaries():
    rng = np.random.default_rng(0)
    included = rng.random(100) < 0.5
    mech = TreeMechanism(trees=4, sample_rate=1.0, depth=3, guides=2, counts=1, columns=3)
    noise = np.random.default_rng(1)
    leaves = replay_leaves(included, mech, np.random.default_rng(2), noise)  # 13 trees of 8
    assert leaves.u.shape == (4, 100)
    assert leaves.sigma == 0
    np.testing.assert_allclose(leaves.u, np.broadcast_to(included, (4, 100)))
    guides = replay_guides(included, mech, noise)
    np.testing.assert_allclose(guides.u, np.broadcast_to(included, (2, 100)))
    bad, std = replay_counts(included, mech, noise)
    assert std == 0
    np.testing.assert_array_equal(bad, np.broadcast_to(included, (3, 100)))


def test_leaf_replay_samples_at_the_rate_and_noises_at_the_joint_multiplier():
    m, trees, q, sigma = 2000, 30, 0.3, 2.0
    mech = TreeMechanism(trees=trees, sample_rate=q, noise_multiplier=sigma, depth=6)
    quiet = replay_leaves(np.ones(m, bool), TreeMechanism(trees=trees, sample_rate=q),
                          np.random.default_rng(3), np.random.default_rng(4))
    assert quiet.u.mean() == pytest.approx(q, abs=4 * math.sqrt(q * (1 - q) / quiet.u.size))
    out = replay_leaves(np.zeros(m, bool), mech, np.random.default_rng(5),
                        np.random.default_rng(6))
    # Out canaries: the projection of (G~, H~) is N(0, joint^2).
    assert out.sigma == pytest.approx(sigma)
    assert out.u.mean() == pytest.approx(0, abs=0.05)
    assert out.u.std() == pytest.approx(sigma, rel=0.03)


def test_counts_likelihood_ratio_is_the_censored_gaussians():
    std = 2.0
    bad = np.array([[0.0, 3.0], [1.5, 0.0]])
    expected = [norm.logcdf(-1 / std) - norm.logcdf(0) + norm.logpdf(1.5, 1, std)
                - norm.logpdf(1.5, 0, std),
                norm.logpdf(3.0, 1, std) - norm.logpdf(3.0, 0, std)
                + norm.logcdf(-1 / std) - norm.logcdf(0)]
    np.testing.assert_allclose(counts_log_lr(bad, std), expected)
    # Without sampling the leaves' and histograms' ratio is the Gaussian's.
    np.testing.assert_allclose(log_likelihood_ratios(np.array([0.3]), std, 1, 1.0),
                               norm.logpdf(0.3, 1, std) - norm.logpdf(0.3, 0, std))


def test_open_trees_are_certified():
    mech = TreeMechanism(trees=30, sample_rate=0.3, depth=4, guides=3, counts=1, columns=4)
    result = tree_audit(mech, delta=DELTA, rng=np.random.default_rng(7))
    assert result["method"] == METHOD
    assert result["statistic"] == "sum"
    assert result["audited_accounted_epsilon"] is None
    assert result["epsilon_lower_bound"] > 3  # no noise: every guess is right


def test_a_small_run_stays_below_its_accounted_epsilon():
    # Counts, histograms and leaves at their accounted parameters: PRV gives epsilon 1.807
    # for them together (`accounted_epsilon("prv", mech.history(), DELTA)`, 1.8 s, hence
    # not recomputed here).
    mech = TreeMechanism(trees=10, sample_rate=0.5, noise_multiplier=LEAVES_EPS1, depth=4,
                         guides=10, guide_noise_multiplier=GUIDES_EPS1, counts=1,
                         count_noise_multiplier=GUIDES_EPS1 / math.sqrt(10), columns=5)
    result = tree_audit(mech, delta=DELTA, rng=np.random.default_rng(8), canaries=2000,
                        account=False)
    assert 0 < result["epsilon_lower_bound"] <= 1.807
    assert result["statistic"] == "likelihood"


def test_dp_scorecards_counts_stay_below_their_accounted_epsilon():
    # The DP scorecard's count release alone, accounted by RDP (instant without sampling).
    mech = TreeMechanism(counts=1, count_noise_multiplier=GUIDES_EPS1 / math.sqrt(10),
                         columns=20, accountant="rdp")
    result = tree_audit(mech, delta=DELTA, rng=np.random.default_rng(10), canaries=2000)
    assert result["audited_accounted_epsilon"] == pytest.approx(
        accounted_epsilon("rdp", mech.history(), DELTA))
    assert 0 < result["epsilon_lower_bound"] <= result["audited_accounted_epsilon"] < 1.2
    assert result["steps"] == 0
    assert "noisy-count release" in result["audited"]


@pytest.mark.parametrize(("module", "mech"), [
    (gbdt_dp, TreeMechanism(trees=10, sample_rate=0.5, noise_multiplier=LEAVES_EPS1, depth=4)),
    (gbdt_dp_guide, TreeMechanism(guides=10, guide_noise_multiplier=GUIDES_EPS1, columns=5)),
])
def test_g_noised_at_hs_bound_is_caught(monkeypatch, module, mech):
    """A typo that noises G at s_G times H's bound 1/4 (a quarter of the noise the accountant
    counts): the releases claim epsilon 1 and the audit proves more. Over seeds 0-5 the honest
    audits gave 0.19-0.48 and the broken 1.18-1.54 (leaves), 0.19-0.37 and 1.24-1.45
    (histograms), at 4000 canaries."""
    kwargs = {"delta": DELTA, "canaries": 5000, "account": False}
    honest = tree_audit(mech, rng=np.random.default_rng(9), **kwargs)
    monkeypatch.setattr(module, "G_BOUND", module.H_BOUND)
    broken = tree_audit(mech, rng=np.random.default_rng(9), **kwargs)
    assert honest["epsilon_lower_bound"] <= 1.0 < broken["epsilon_lower_bound"]


def _line(purpose: str, sigma: float, q: float = 1.0, steps: int = 1) -> GaussianRelease:
    return GaussianRelease(party=gbdt_dp.AUTHORITY, population="train", purpose=purpose,
                           noise_multiplier=sigma, sample_rate=q, steps=steps, round=0,
                           epsilon=1.0, delta=DELTA, accountant="prv")


def test_a_tree_runs_ledger_names_its_releases():
    lines = [_line("statistics", 30.0), _line(gbdt_dp_init.COUNTS_PURPOSE, 9.0),
             _line(gbdt_dp_init.STEPS_PURPOSE, 7.0, steps=6),
             _line(gbdt_dp.GUIDE_PURPOSE, 10.0, steps=6),
             _line(gbdt_dp.TREES_PURPOSE, 19.0, q=0.3, steps=300)]
    joined = SimpleNamespace(xs={"a": np.zeros((3, 4)), "b": np.zeros((3, 2))})
    authority = {"model_kind": "gbdt", "accountant": "prv",
                 "gbdt": {"depth": 5, "hessian_noise": 3.0, "guide_stat": "bins"}}
    mech = model_mechanism(joined, authority, lines)  # type: ignore[arg-type]
    assert mech == TreeMechanism(
        depth=5, trees=300, sample_rate=0.3, noise_multiplier=19.0, hessian_noise=3.0,
        guides=6, guide_noise_multiplier=10.0, counts=1, count_noise_multiplier=9.0,
        columns=6, not_audited=mech.not_audited)
    assert f"ledger line {gbdt_dp_init.STEPS_PURPOSE!r}" in mech.not_audited
    # A histogram release of another statistic is named, not audited.
    score = from_ledger(lines, depth=5, hessian_noise=3.0, guide_stat="score", columns=6,
                        accountant="prv")
    assert score is not None
    assert score.guides == 0
    # The DP scorecard: its counts; an MLP run or SecureBoost trees: the DP-SGD audit.
    card = model_mechanism(joined, {"model_kind": "scorecard"},  # type: ignore[arg-type]
                           [_line(scorecard_dp.COUNTS_PURPOSE, 5.0)])
    assert card is not None
    assert (card.counts, card.trees) == (1, 0)
    assert model_mechanism(joined, {"model_kind": "mlp"}, lines) is None  # type: ignore[arg-type]
    assert model_mechanism(joined, authority, lines[:1]) is None  # type: ignore[arg-type]
