"""Known answers for privacy accounting: ours (Opacus) against Google's dp-accounting."""

from __future__ import annotations

import math

import pytest

from clients.protocol.accounting import add_steps, affordable_steps, calibrate_sigma, epsilon
from server.ledger_lines import history_event
from simulations.analysis.ledger_verify import independent_epsilon

# (sigma, q, steps): a small grid plus what the default run uses (100,000 people, batch 512,
# 4 epochs, epsilon 1: sigma ~1.02 with PRV, ~1.17 with RDP, q ~0.0085, 468 steps).
GRID = [
    (1.02, 0.00853, 468),
    (1.17, 0.00853, 468),
    (0.8, 0.01, 1000),
    (2.0, 0.05, 200),
    (4.0, 0.2, 50),
    (1.5, 0.001, 5000),
]
DELTA = 1e-5


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID)
def test_rdp_agrees_with_dp_accounting_within_1_percent(sigma, q, steps):
    ours = epsilon("rdp", [(sigma, q, steps)], DELTA)
    theirs = independent_epsilon(history_event([(sigma, q, steps)]), DELTA, "rdp")
    assert ours == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize(("sigma", "q", "steps"), GRID)
def test_prv_agrees_with_pld_within_2_percent(sigma, q, steps):
    ours = epsilon("prv", [(sigma, q, steps)], DELTA)
    theirs = independent_epsilon(history_event([(sigma, q, steps)]), DELTA, "prv")
    assert ours == pytest.approx(theirs, rel=0.02)


def test_rdp_is_looser_than_prv():
    # Published: RDP over-reports by roughly 9-14 % against PRV/PLD.
    hist = [(1.02, 0.00853, 468)]
    assert epsilon("rdp", hist, DELTA) > epsilon("prv", hist, DELTA)


def test_history_is_run_length_encoded_and_composes():
    hist = add_steps(add_steps([], 1.0, 0.01, 100), 1.0, 0.01, 50)
    assert hist == [(1.0, 0.01, 150)]
    mixed = add_steps(hist, 2.0, 0.01, 10)
    assert len(mixed) == 2
    assert epsilon("rdp", mixed, DELTA) > epsilon("rdp", hist, DELTA)
    assert epsilon("rdp", mixed, DELTA) == pytest.approx(
        independent_epsilon(history_event(mixed), DELTA, "rdp"), rel=0.01
    )


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_calibration_hits_the_target(kind):
    sigma = calibrate_sigma(1.0, DELTA, 0.00853, 468, kind)
    eps = epsilon(kind, [(sigma, 0.00853, 468)], DELTA)
    assert 0.98 <= eps <= 1.0


def test_dp_off_needs_no_noise():
    assert calibrate_sigma(math.inf, DELTA, 0.01, 100, "rdp") == 0.0


def test_affordable_steps_stop_before_the_cap():
    sigma, q = 1.0, 0.01
    n = affordable_steps("rdp", [], sigma, q, 10_000, DELTA, cap=1.0)
    assert epsilon("rdp", [(sigma, q, n)], DELTA) <= 1.0
    assert epsilon("rdp", [(sigma, q, n + 1)], DELTA) > 1.0


def test_the_memoised_opacus_rdp_gives_opacus_own_numbers():
    """clients/protocol/accounting.py memoises Opacus's per-order RDP: the same floats as the
    function it wraps, for integer and fractional orders, and a repeated question is a hit."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    memo = opacus_rdp._compute_rdp
    assert hasattr(memo, "cache_info")
    for q, sigma, alpha in ((0.01, 2.9, 1.5), (0.37, 1.1, 32.0), (1.0, 40.0, 2.0), (0.2, 0.7, 3.3)):
        assert memo(q, sigma, alpha) == memo.__wrapped__(q, sigma, alpha)
    hits = memo.cache_info().hits
    memo(0.01, 2.9, 1.5)
    assert memo.cache_info().hits == hits + 1
