"""The DP WoE scorecard (`model.kind=scorecard` at a finite privacy.epsilon; server/scorecard_dp.py
and server/scorecard_dp_run.py): its configuration, the accounting's known answer, and a
difference attack on the released per-bin counts. The phase over the silos' real ClientApp is
tests/test_scorecard_wire.py's (its federation fixture)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy.optimize import brentq
from scipy.stats import norm

from clients.protocol.accounting import epsilon as accounted_epsilon
from crypto.secret_random import SecretRandom
from server import gbdt_dp_run, scorecard_dp, scorecard_dp_run
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat, to_flat

DP = {"model.kind": "scorecard", "privacy.epsilon": "1"}
FAST = {**DP, "privacy.accountant": "rdp"}  # RDP without subsampling calibrates in ms
SECRET = b"\x0b" * 32


# ---- configuration -----------------------------------------------------------------------


def test_a_dp_scorecard_is_accepted_and_idles_the_runs_sgd_machinery() -> None:
    cfg = parse_flat(AuthorityConfig, DP)
    assert scorecard_dp_run.dp_scorecard(cfg)
    idle = gbdt_dp_run.sgd_config(cfg)
    assert not idle.privacy.dp_sgd
    assert not idle.privacy.label_dp
    assert parse_flat(AuthorityConfig, to_flat(cfg)) == cfg
    plain = parse_flat(AuthorityConfig, {**DP, "privacy.epsilon": "inf"})
    assert not scorecard_dp_run.dp_scorecard(plain)
    assert gbdt_dp_run.sgd_config(plain) is plain


def test_a_budget_the_statistics_already_spend_is_refused_with_the_models_name() -> None:
    cfg = parse_flat(AuthorityConfig, {**FAST, "privacy.epsilon": "0.01"})
    with pytest.raises(ConfigError, match="too small for the DP scorecard"):
        gbdt_dp_run.plan_budget(cfg, ("payments", "social", "device"), 5000,
                                scorecard_dp_run.dp_params(cfg))


def test_a_dp_scorecard_run_says_its_epsilon_and_what_the_authority_sees() -> None:
    from simulations.cli.run import privacy_rows

    out = {"model": {"bias": 0.0}, "epsilon": {"model": 0.99}, "delta": 1e-6,
           "authority_sees": ["the sum"], "history": [{"bins": 90, "clip": 2.5}]}
    scorecard_dp_run.annotate(out, parse_flat(AuthorityConfig, DP))
    assert out["model_kind"] == "scorecard"
    section = out["scorecard"]
    assert section["model_epsilon"] == 0.99
    assert "0.99" in section["model_note"]
    assert "not spent" in section["label_protection"]
    assert (section["bins"], section["clip_bound"], section["steps"]) == (90, 2.5, 6)
    assert any("pre-bin" in line for line in out["authority_sees"])
    rows = dict(privacy_rows({"model_kind": "scorecard",
                              "epsilon": {"model": 0.99, "label": None}}))
    assert "0.990" in rows.values()
    assert any("DP scorecard sends the silos nothing" in v for v in rows.values())


# ---- the accounting: a known answer -------------------------------------------------------


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle and Wang (ICML 2018): the exact epsilon of one Gaussian mechanism of
    multiplier sigma at delta."""
    def gap(eps: float) -> float:
        return (norm.cdf(-eps * sigma + 0.5 / sigma)
                - math.exp(eps) * norm.cdf(-eps * sigma - 0.5 / sigma) - delta)
    return float(brentq(gap, 1e-9, 50.0))


def test_the_ledgers_epsilon_is_the_mechanisms() -> None:
    """Counts and steps read every training person once each, without subsampling: together
    ONE Gaussian mechanism of multiplier (sum 1/sigma_i^2)^(-1/2), whose exact epsilon is
    known in closed form. dp-accounting's PLD over the ledger lines' events gives it; the
    ledger's last line says at least it and at most the target (RDP, an upper bound), and the
    project's PRV accountant agrees within its error."""
    params = scorecard_dp.DpScorecardParams(accountant="rdp")  # calibrates in milliseconds
    delta = 1e-6
    release = scorecard_dp.plan_noise(params, epsilon_=1.0, delta=delta)
    lines = release.ledger_lines()
    assert [(ln.steps, ln.sample_rate) for ln in lines] == [(1, 1.0), (params.steps, 1.0)]
    whole = 1 / math.sqrt(1 / release.count_noise_multiplier**2
                          + params.steps / release.noise_multiplier**2)
    exact = _analytic_gaussian_epsilon(whole, delta)
    pld = pld_privacy_accountant.PLDAccountant()
    for line in lines:
        pld.compose(line.dp_event())
    assert pld.get_epsilon(delta) == pytest.approx(exact, rel=0.01)
    assert exact <= lines[-1].epsilon == release.epsilon <= 1.0 * 1.005
    assert exact > 0.8  # RDP's looseness is small here: the noise is not wasted
    prv = accounted_epsilon("prv", release.history(), delta, precise=False)
    assert exact * 0.995 <= prv <= exact * 1.02
    # The step's two blocks: 1/s_G^2 + 1/s_H^2 = 1/sigma^2, s_H = hessian_noise * s_G.
    assert release.hessian_noise_multiplier == pytest.approx(
        params.hessian_noise * release.gradient_noise_multiplier)
    assert 1 / release.gradient_noise_multiplier**2 + 1 / release.hessian_noise_multiplier**2 \
        == pytest.approx(1 / release.noise_multiplier**2)


# ---- a difference attack on the released per-bin counts ----------------------------------


def test_a_difference_attack_on_the_counts_is_held_to_the_gaussian_bound() -> None:
    """The attacker knows every other person exactly and the target's pre-bins; it sees the
    released counts of D or of D + the target (a defaulter) and sums the defaulter counts of
    the target's cells less the known ones. Without noise that tells membership every time;
    with the release's noise its best accuracy is Phi(mu / 2), mu = 1 / the counts'
    multiplier (the release is mu-GDP), within the (epsilon, delta) bound of the counts."""
    rng = np.random.default_rng(11)
    bins, rows = 8, 1000
    data = {"a": rng.integers(0, bins, (rows, 3)), "b": rng.integers(0, bins, (rows, 2))}
    y = (rng.random(rows) < 0.2).astype(np.float64)
    target = {"a": np.array([[1, 5, 7]]), "b": np.array([[0, 3]])}
    with_target = {s: np.vstack([b, target[s]]) for s, b in data.items()}
    y_in = np.append(y, 1.0)
    params = scorecard_dp.DpScorecardParams(accountant="rdp")
    # At epsilon 4 the bound Phi(mu / 2) is well away from both 1/2 and 1.
    noisy = scorecard_dp.plan_noise(params, epsilon_=4.0, delta=1e-5)
    exact = scorecard_dp.plan_noise(params, epsilon_=math.inf, delta=1e-5)
    known = scorecard_dp.noisy_counts(data, y, bins, exact, rng)

    def statistic(counts: dict) -> float:
        return sum(float(counts[s][0][f, target[s][0, f]] - known[s][0][f, target[s][0, f]])
                   for s in data for f in range(data[s].shape[1]))

    def accuracy(release: scorecard_dp.DpScorecardRelease, trials: int) -> float:
        columns = 5
        threshold = columns / 2  # halfway between the two means (0 and one per column)
        right = 0
        for i in range(trials):
            member = i % 2 == 1
            counts = scorecard_dp.noisy_counts(with_target if member else data,
                                               y_in if member else y, bins, release, rng)
            right += (statistic(counts) > threshold) == member
        return right / trials

    assert accuracy(exact, 40) == 1.0
    trials = 400
    got = accuracy(noisy, trials)
    mu = 1 / noisy.count_noise_multiplier
    bound = norm.cdf(mu / 2)
    assert abs(got - bound) <= 4 * math.sqrt(bound * (1 - bound) / trials) + 0.01
    eps_counts = noisy.ledger_lines()[0].epsilon
    assert got <= math.exp(eps_counts) / (1 + math.exp(eps_counts)) + 1e-5 + 0.02


def test_the_noise_comes_from_the_authoritys_secret_alone() -> None:
    """The same secret and purpose give the same model, another secret another one; no public
    seed enters (fit_from_bins takes none)."""
    rng = np.random.default_rng(2)
    bins = {"a": rng.integers(0, 8, (600, 2)), "b": rng.integers(0, 8, (600, 1))}
    y = (rng.random(600) < 0.1 + 0.05 * bins["a"][:, 0]).astype(np.float64)
    params = scorecard_dp.DpScorecardParams(accountant="rdp",
                                            card=scorecard_dp.ScorecardParams(bins=8))
    release = scorecard_dp.plan_noise(params, epsilon_=2.0, delta=1e-5)

    def coef(secret: bytes, purpose: str = "k") -> np.ndarray:
        fit = scorecard_dp.fit_from_bins(bins, y, params, release, SecretRandom(secret),
                                         purpose=purpose)
        return np.concatenate([*fit.model.coef.values(), [fit.model.intercept]])

    np.testing.assert_array_equal(coef(b"\x01" * 32), coef(b"\x01" * 32))
    assert not np.array_equal(coef(b"\x01" * 32), coef(b"\x02" * 32))
    assert not np.array_equal(coef(b"\x01" * 32), coef(b"\x01" * 32, "other run"))
