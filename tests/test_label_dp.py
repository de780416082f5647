"""Label DP mechanisms: RRWithPrior is eps-label-DP for every prior, reduces to RR under an
uninformative prior, and its training loss is the derivative the authority sends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.label_dp import (
    corrected_gradient,
    flip_probability,
    keep_probability,
    prior_pins,
    randomized_response,
    release_gradient,
    release_log_loss,
    release_probabilities,
    rr_with_prior,
    stage_split,
)

# Up to 10: beyond it 1 - P(released = 1) loses the flip probability's digits to rounding.
epsilons = st.floats(min_value=0.01, max_value=10.0, allow_nan=False)
priors = st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=1,
                  max_size=50)


def _ratio(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p / q with 0 / 0 = 1 (an output impossible under both labels distinguishes nothing)."""
    both_zero = (p == 0) & (q == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(both_zero, 1.0, p / q)


@settings(max_examples=300, deadline=None)
@given(prior=priors, eps=epsilons)
def test_rr_with_prior_is_exactly_eps_label_dp_for_every_prior(prior, eps):
    if_one, if_zero = release_probabilities(np.array(prior), eps)
    bound = math.exp(eps) * (1 + 1e-9)  # float rounding of 1 - rho, nothing more
    for out_if_one, out_if_zero in ((if_one, if_zero), (1 - if_one, 1 - if_zero)):
        assert np.all(_ratio(out_if_one, out_if_zero) <= bound)
        assert np.all(_ratio(out_if_zero, out_if_one) <= bound)
    assert np.all((if_zero >= 0) & (if_zero <= 1) & (if_one >= 0) & (if_one <= 1))


@settings(max_examples=200, deadline=None)
@given(eps=epsilons, u=st.floats(min_value=0.0, max_value=1.0), seed=st.integers(0, 2**32 - 1))
def test_uninformative_prior_gives_plain_rr(eps, u, seed):
    # Any prior whose top probability is at most e^eps / (1 + e^eps) leaves every label to RR;
    # the uniform prior 0.5 is the extreme case.
    t = keep_probability(eps)
    prior = np.array([0.5, (1 - t) + u * (2 * t - 1)])
    assert not prior_pins(prior, eps).any()
    if_one, if_zero = release_probabilities(prior, eps)
    assert np.allclose(if_one, 1 - flip_probability(eps))
    assert np.allclose(if_zero, flip_probability(eps))
    y = np.random.default_rng(seed).integers(0, 2, 2_000).astype(np.int8)
    half = np.full(len(y), 0.5)
    same = rr_with_prior(y, half, eps, np.random.default_rng(seed))
    assert np.array_equal(same, randomized_response(y, eps, np.random.default_rng(seed)))


def test_release_probabilities_describe_the_mechanism():
    eps = 1.0
    prior = np.repeat([0.02, 0.3, 0.5, 0.7, 0.97], 40_000)
    rng = np.random.default_rng(7)
    for label in (0, 1):
        y = np.full(len(prior), label, np.int8)
        out = rr_with_prior(y, prior, eps, rng)
        if_one, if_zero = release_probabilities(prior, eps)
        expected = if_one if label else if_zero
        for p in np.unique(prior):
            sel = prior == p
            assert out[sel].mean() == pytest.approx(expected[sel][0], abs=0.008)
    # Top probability above e / (1 + e) = 0.731: pinned to the prior's argmax; else RR.
    assert prior_pins(np.array([0.02, 0.3, 0.5, 0.7, 0.97]), eps).tolist() == [
        True, False, False, False, True]


def test_no_privacy_releases_the_labels():
    y = np.array([0, 1, 1, 0], np.int8)
    prior = np.array([0.999, 0.0, 0.5, 1.0])
    assert np.array_equal(rr_with_prior(y, prior, math.inf, np.random.default_rng(0)), y)
    if_one, if_zero = release_probabilities(prior, math.inf)
    assert np.array_equal(if_one, np.ones(4))
    assert np.array_equal(if_zero, np.zeros(4))


@settings(max_examples=100, deadline=None)
@given(
    z=st.lists(st.floats(min_value=-12, max_value=12), min_size=1, max_size=20),
    eps=epsilons,
    prior=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(0, 2**16),
)
def test_release_gradient_is_the_derivative_of_the_release_likelihood(z, eps, prior, seed):
    n = len(z)
    rng = np.random.default_rng(seed)
    released = rng.integers(0, 2, n).astype(np.float64)
    priors_ = np.full(n, prior)
    if_one, if_zero = release_probabilities(priors_, eps)
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    q = torch.from_numpy(if_zero) + torch.from_numpy(if_one - if_zero) * torch.sigmoid(zt)
    q = q.clamp(1e-12, 1 - 1e-12)
    torch.nn.functional.binary_cross_entropy(q, torch.from_numpy(released),
                                             reduction="sum").backward()
    ours = release_gradient(np.array(z), released, if_one, if_zero)
    assert np.allclose(ours, zt.grad.numpy(), atol=1e-7)
    assert np.allclose(release_log_loss(np.array(z), released, if_one, if_zero),
                       torch.nn.functional.binary_cross_entropy(
                           q, torch.from_numpy(released), reduction="none").detach().numpy())
    if prior_pins(np.array([prior]), eps)[0]:
        assert np.all(ours == 0)  # a release that ignores y teaches nothing
    else:
        assert np.allclose(ours, corrected_gradient(np.array(z), released,
                                                    flip_probability(eps)))


def test_clean_labels_give_the_plain_gradient_even_when_saturated():
    z = np.array([-800.0, -30.0, 0.0, 30.0, 800.0])
    y = np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    s = 0.5 * (1 + np.tanh(0.5 * z))
    assert np.array_equal(release_gradient(z, y, 1.0, 0.0), s - y)


def test_stage_split_is_a_partition_of_the_requested_share():
    positions = np.arange(10, 1010)
    a, b = stage_split(positions, np.random.default_rng(3))
    assert len(a) == len(b) == 500
    assert np.array_equal(np.sort(np.concatenate([a, b])), positions)
    with pytest.raises(ValueError, match="share"):
        stage_split(positions, np.random.default_rng(3), share=1.0)
