"""Empirical privacy audit: Clopper-Pearson bounds, the epsilon lower bound, and the attack on
an overfit model, a strongly private model, and no model at all (same-distribution losses)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from simulations.analysis import audit
from simulations.analysis.audit import (
    AuditResult,
    clopper_pearson,
    empirical_epsilon,
    membership_audit,
    per_example_loss,
)

N_SIDE = 200  # members and non-members in the model tests
N_FEATURES = 50  # high-dimensional: non-members sit far from the memorised points
DELTA = 1e-3


# ---- Clopper-Pearson ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 0.3085),  # upper = 1 - 0.025 ** (1 / 10)
        (10, 10, 0.6915, 1.0),  # lower = 0.025 ** (1 / 10)
        (5, 10, 0.1871, 0.8129),
        (1, 10, 0.0025, 0.4450),
    ],
)
def test_clopper_pearson_matches_textbook_values(k, n, lo, hi):
    got_lo, got_hi = clopper_pearson(k, n, 0.05)
    assert isinstance(got_lo, float)
    assert got_lo == pytest.approx(lo, abs=1e-4)
    assert got_hi == pytest.approx(hi, abs=1e-4)


def test_clopper_pearson_zero_and_all_successes_have_closed_forms():
    n = np.array([1, 7, 100, 5000])
    lo_all, hi_all = clopper_pearson(n, n, 0.05)
    lo_none, hi_none = clopper_pearson(np.zeros_like(n), n, 0.05)
    np.testing.assert_allclose(lo_all, 0.025 ** (1 / n), rtol=1e-9)
    np.testing.assert_array_equal(hi_all, 1.0)
    np.testing.assert_array_equal(lo_none, 0.0)
    np.testing.assert_allclose(hi_none, 1 - 0.025 ** (1 / n), rtol=1e-9)


def test_clopper_pearson_is_vectorised_and_broadcasts():
    k = np.arange(12).reshape(3, 4)
    lo, hi = clopper_pearson(k, 20, 0.05)
    assert lo.shape == hi.shape == (3, 4)
    # Elementwise equal to scalar calls.
    assert lo[2, 3] == pytest.approx(clopper_pearson(11, 20, 0.05)[0])
    assert np.all(np.diff(lo.ravel()) > 0)


@given(
    n=st.integers(min_value=1, max_value=5000),
    frac=st.floats(min_value=0, max_value=1),
    alpha=st.floats(min_value=1e-4, max_value=0.5),
)
def test_clopper_pearson_interval_contains_the_estimate(n, frac, alpha):
    k = round(frac * n)
    lo, hi = clopper_pearson(k, n, alpha)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    # Asking for more confidence never narrows the interval.
    lo2, hi2 = clopper_pearson(k, n, alpha / 2)
    assert lo2 <= lo + 1e-12
    assert hi2 >= hi - 1e-12


# ---- epsilon from rates ---------------------------------------------------------------------


rate = st.floats(min_value=0, max_value=1)


@given(t1=rate, t2=rate, f1=rate, f2=rate, delta=st.floats(min_value=0, max_value=0.5))
def test_empirical_epsilon_is_nonnegative_and_monotone(t1, t2, f1, f2, delta):
    t_lo, t_hi = sorted((t1, t2))
    f_lo, f_hi = sorted((f1, f2))
    eps = empirical_epsilon(t_lo, f_hi, delta)
    assert eps >= 0
    # Higher TPR or lower FPR can only prove more.
    assert empirical_epsilon(t_hi, f_hi, delta) >= eps
    assert empirical_epsilon(t_lo, f_lo, delta) >= eps
    # A larger delta can only prove less.
    assert empirical_epsilon(t_lo, f_hi, min(delta * 1.5 + 1e-3, 0.99)) <= eps


def test_empirical_epsilon_known_values_and_edges():
    assert empirical_epsilon(0.5, 0.1, 0.0) == pytest.approx(math.log(5))
    assert empirical_epsilon(0.5, 0.1, 0.1) == pytest.approx(math.log(4))
    assert empirical_epsilon(0.1, 0.5, 0.0) == 0.0  # a worse-than-chance test proves nothing
    assert empirical_epsilon(0.05, 0.0, 0.05) == 0.0  # 0 / 0: nothing can be claimed
    assert empirical_epsilon(0.3, 0.0, 0.0) == math.inf


# ---- the audit on synthetic losses ----------------------------------------------------------


def test_same_distribution_losses_claim_nothing():
    rng = np.random.default_rng(0)
    losses = rng.exponential(size=(2, 5000))
    result = membership_audit(losses[0], losses[1], DELTA)
    assert result.epsilon_lower < 0.1
    assert result.attack_auc == pytest.approx(0.5, abs=0.02)


def test_false_claims_are_rare_across_many_null_audits():
    """With no membership signal at all, a positive claim is a false claim: the threshold is
    chosen on a held-out half, so they must occur at most at about the alpha rate."""
    rng = np.random.default_rng(1)
    claims = [
        membership_audit(*rng.normal(size=(2, 400)), 0.0, seed=s).epsilon_lower > 0
        for s in range(40)
    ]
    assert sum(claims) <= 4  # alpha = 0.05 would expect 2 of 40 at worst


def test_large_audits_try_at_most_max_thresholds(monkeypatch):
    sizes = []

    def counting(successes, trials, alpha):
        sizes.append(np.size(successes))
        return clopper_pearson(successes, trials, alpha)

    monkeypatch.setattr(audit, "clopper_pearson", counting)
    rng = np.random.default_rng(2)
    members, nonmembers = rng.exponential(size=30_000), rng.exponential(size=30_000) + 0.5
    result = membership_audit(members, nonmembers, DELTA)
    assert max(sizes) == audit.MAX_THRESHOLDS  # 30,000 distinct losses in the selection half
    # The coarser grid still finds the signal (everything below 0.5 is a member).
    assert result.epsilon_lower > 0.2
    assert result.threshold in set(members) | set(nonmembers)


def test_perfect_separation_gives_the_closed_form_bound():
    members, nonmembers = np.zeros(200), np.ones(200)
    result = membership_audit(members, nonmembers, DELTA)
    tpr_low = 0.025 ** (1 / 100)  # 100 of 100 members caught in the evaluation half
    fpr_high = 1 - 0.025 ** (1 / 100)  # 0 of 100 non-members
    assert result.epsilon_lower == pytest.approx(math.log((tpr_low - DELTA) / fpr_high))
    assert (result.tpr, result.fpr, result.attack_auc) == (1.0, 0.0, 1.0)
    assert result.n_members == result.n_nonmembers == 200
    assert result.confidence == pytest.approx(0.95)


def test_audit_is_reproducible_and_serialisable():
    rng = np.random.default_rng(2)
    m, n = rng.normal(0, 1, 300), rng.normal(0.5, 1, 300)
    a, b = membership_audit(m, n, DELTA, seed=7), membership_audit(m, n, DELTA, seed=7)
    assert a == b
    d = json.loads(json.dumps(a.to_dict()))
    assert AuditResult(**d) == a


# ---- the audit on trained models ------------------------------------------------------------


def _random_label_data(seed: int) -> tuple[torch.Tensor, ...]:
    """Random labels: only memorisation can fit the members, so non-members stay at chance."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * N_SIDE, N_FEATURES, generator=g)
    y = torch.randint(0, 2, (2 * N_SIDE,), generator=g).float()
    return x[:N_SIDE], y[:N_SIDE], x[N_SIDE:], y[N_SIDE:]


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1)
    )


def _losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        p = torch.sigmoid(model(x)).squeeze(1).numpy()
    return per_example_loss(y.numpy(), p)


def _audit(model, xm, ym, xn, yn) -> AuditResult:
    return membership_audit(_losses(model, xm, ym), _losses(model, xn, yn), DELTA)


@pytest.fixture(scope="module")
def overfit_audit() -> AuditResult:
    torch.manual_seed(0)
    xm, ym, xn, yn = _random_label_data(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    bce = torch.nn.BCEWithLogitsLoss()
    for _ in range(400):  # full batch, no regularisation: memorise
        opt.zero_grad()
        bce(model(xm).squeeze(1), ym).backward()
        opt.step()
    return _audit(model, xm, ym, xn, yn)


@pytest.fixture(scope="module")
def private_audit() -> tuple[AuditResult, float]:
    torch.manual_seed(0)
    xm, ym, xn, yn = _random_label_data(0)
    model = _mlp()
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(TensorDataset(xm, ym), batch_size=50),
        noise_multiplier=12.0,
        max_grad_norm=1.0,
    )
    bce = torch.nn.BCEWithLogitsLoss()
    for _ in range(5):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            opt.zero_grad()
            bce(model(xb).squeeze(1), yb).backward()
            opt.step()
    return _audit(model, xm, ym, xn, yn), engine.get_epsilon(DELTA)


def test_overfit_model_leaks_membership(overfit_audit):
    assert overfit_audit.attack_auc > 0.9
    assert overfit_audit.epsilon_lower > 1.0
    assert overfit_audit.tpr > overfit_audit.fpr


@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
def test_strongly_private_model_stays_below_its_accounted_epsilon(private_audit):
    result, accounted = private_audit
    assert 0 < accounted < 2  # the training really was (strongly) private
    assert result.epsilon_lower < 0.2
    assert result.epsilon_lower <= accounted
    assert result.attack_auc == pytest.approx(0.5, abs=0.1)


# ---- bad input --------------------------------------------------------------------------------

GOOD = np.linspace(0.1, 1.0, 40)


@pytest.mark.parametrize(
    ("members", "nonmembers", "kwargs", "match"),
    [
        (np.array([]), GOOD, {}, "member losses are empty"),
        (GOOD, np.array([]), {}, "non-member losses are empty"),
        (np.append(GOOD, np.nan), GOOD, {}, "NaN or inf"),
        (GOOD, np.append(GOOD, np.inf), {}, "NaN or inf"),
        (GOOD[:10], GOOD, {}, "at least 20 per side"),
        (GOOD.reshape(20, 2), GOOD, {}, r"1-D array.*ravel"),
        (GOOD, GOOD, {"delta": 1.0}, r"delta must be in \[0, 1\)"),
        (GOOD, GOOD, {"delta": -0.1}, r"delta must be in \[0, 1\)"),
        (GOOD, GOOD, {"alpha": 0.0}, r"alpha must be in \(0, 1\)"),
        (GOOD, GOOD, {"alpha": 1.5}, r"alpha must be in \(0, 1\)"),
    ],
)
def test_bad_audit_input_is_rejected_with_a_fix(members, nonmembers, kwargs, match):
    delta = kwargs.pop("delta", DELTA)
    with pytest.raises(ValueError, match=match):
        membership_audit(members, nonmembers, delta, **kwargs)


def test_bad_rates_and_counts_are_rejected():
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        clopper_pearson(11, 10, 0.05)
    with pytest.raises(ValueError, match="trials >= 1"):
        clopper_pearson(0, 0, 0.05)
    with pytest.raises(ValueError, match="whole numbers"):
        clopper_pearson(2.5, 10, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson(1, 10, 1.0)
    with pytest.raises(ValueError, match="fpr_high must be a rate"):
        empirical_epsilon(0.5, 1.5, 0.0)
    with pytest.raises(ValueError, match="delta"):
        empirical_epsilon(0.5, 0.1, 1.0)


def test_loss_needs_matching_shapes_and_probabilities():
    y = np.array([0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        per_example_loss(y, np.full((3, 1), 0.5))
    with pytest.raises(ValueError, match="not logits"):
        per_example_loss(y, np.array([0.2, 3.0, 0.5]))
    with pytest.raises(ValueError, match="labels must be"):
        per_example_loss(np.array([0.0, 2.0, 1.0]), np.full(3, 0.5))


def test_loss_is_binary_cross_entropy_and_finite_at_certainty():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    p = np.array([0.8, 0.8, 1.0, 0.0])
    loss = per_example_loss(y, p)
    np.testing.assert_allclose(loss[:2], [-math.log(0.8), -math.log(0.2)])
    assert np.all(np.isfinite(loss))
    assert 0 < loss[2] < 1e-9
    assert 0 < loss[3] < 1e-9
