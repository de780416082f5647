"""DP trees guided by noisy split histograms (server/gbdt_dp_guide.py): the accounting's known
answer, the bins request and local routing, what the silos receive, reproducibility from the
secret stream, and an attack on the released histograms held to the (epsilon, delta) bound."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import dp_accounting as dpa
import numpy as np
import pytest

from clients.protocol.accounting import epsilon as accounted_epsilon
from clients.protocol.gbdt import RouteReply
from clients.silo.gbdt import bin_index
from crypto.secret_random import SecretRandom
from server import gbdt_dp_guide as guide
from server.gbdt import predict_trees
from server.gbdt_dp import DpTreeParams, plan_noise, route_all
from server.ledger_lines import budget_event
from server.metrics import auc
from tests.test_gbdt_dp import RDP, Recording, _excess, fixed_release, problem, silos_of

SECRET = SecretRandom(b"\x05" * 32)


def guided(**kw: object) -> DpTreeParams:
    base: dict[str, object] = {"trees": 20, "depth": 3, "sample_rate": 1.0, "guide_every": 10,
                               "guide_sigma": 30.0, "accountant": RDP}
    return DpTreeParams(**{**base, **kw})  # type: ignore[arg-type]


def guided_release(params: DpTreeParams, sigma: float = 5.0):
    return dataclasses.replace(
        fixed_release(params, sigma), guides=params.guides,
        guide_noise_multiplier=params.guide_sigma,
        guide_gradient_noise_multiplier=params.guide_sigma,
        guide_hessian_noise_multiplier=params.guide_sigma)


# ---- accounting ---------------------------------------------------------------------------


def test_the_histograms_are_accounted_before_the_leaves_known_answer() -> None:
    params = guided()
    release = plan_noise(params, epsilon_=2.0, delta=1e-5)
    assert release.guides == 2
    assert release.history() == [(20.0, 1.0, 1), (30.0, 1.0, 2),
                                 (release.noise_multiplier, 1.0, 20)]
    assert 0.97 * 2.0 <= release.epsilon <= 2.0
    # The leaves get less budget than without the histograms: more noise.
    unguided = plan_noise(dataclasses.replace(params, guide_every=0), epsilon_=2.0, delta=1e-5)
    assert release.noise_multiplier > unguided.noise_multiplier
    # G and H whiten to the guide's multiplier, H noised hessian_noise times harder.
    s_g, s_h = release.guide_gradient_noise_multiplier, release.guide_hessian_noise_multiplier
    assert s_h == pytest.approx(params.hessian_noise * s_g)
    assert 1 / math.sqrt(s_g**-2 + s_h**-2) == pytest.approx(30.0)
    prior, hist, trees = release.ledger_lines()
    assert (hist.purpose, hist.steps, hist.sample_rate) == ("dp-trees split histograms", 2, 1.0)
    assert hist.epsilon == accounted_epsilon(RDP, [(20.0, 1.0, 1), (30.0, 1.0, 2)], 1e-5)
    assert trees.epsilon == release.epsilon
    # Known answer: Gaussians on everyone compose to ONE Gaussian of multiplier
    # (sum 1/sigma^2)^-1/2, so the prior and the two histogram releases must cost exactly what
    # that single Gaussian costs under Google's PLD accountant.
    pld = dpa.pld.PLDAccountant().compose(budget_event([prior, hist])).get_epsilon(1e-5)
    single = 1 / math.sqrt(1 / 20.0**2 + 2 / 30.0**2)
    exact = dpa.pld.PLDAccountant().compose(dpa.GaussianDpEvent(single)).get_epsilon(1e-5)
    assert pld == pytest.approx(exact, rel=1e-3)
    assert exact <= hist.epsilon  # RDP upper-bounds it
    assert trees.epsilon == accounted_epsilon(RDP, release.history(), 1e-5)


# ---- the bins and local routing -----------------------------------------------------------


def test_the_bins_request_gives_each_persons_bin_and_routes_as_the_silos_do() -> None:
    xs, _ = problem(300)
    silos = silos_of(xs, bins=16)
    binned = guide.ask_bins(silos, 16)
    assert binned.slots == (("bank", 0), ("bank", 1), ("telco", 0), ("telco", 1))
    expected = np.hstack([bin_index(xs["bank"], 16), bin_index(xs["telco"], 16)])
    np.testing.assert_array_equal(binned.bins, expected)
    p = np.full(4 * 15, 1 / 60)
    structure = guide.draw_stage(p, binned, 16, 3, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(guide.leaves_of(structure, binned, 3),
                                  route_all(silos, structure, 300, 3))
    # Bits that no binning gives (left at a threshold, right at the next) are refused.
    reply = silos["bank"].route(guide.bins_request(2, 16))
    bad = reply.left.copy()
    bad[3, :] = ~bad[4, :] | bad[3, :]
    bad[4, :] = False
    with pytest.raises(ValueError, match="no binning"):
        guide.bins_from_reply(RouteReply(silo="bank", left=bad), 2, 16)


def test_gains_find_the_informative_column_and_weights_follow_them() -> None:
    xs, y = problem(3000)
    binned = guide.ask_bins(silos_of(xs), 32)
    g, h = y.mean() - y, np.full(len(y), 0.25)
    g_hist, h_hist = guide.noisy_histograms(binned, g, h, 32, None, np.random.default_rng(0))
    gains = guide.split_gains(g_hist, h_hist, 1.0)
    assert np.unravel_index(gains.argmax(), gains.shape)[0] == 0  # x0 carries 3 x0
    p = guide.slot_weights(gains, beta=10.0, mix=0.2)
    assert p.sum() == pytest.approx(1.0)
    assert p.reshape(gains.shape)[0].sum() > 0.5
    assert p.min() >= 0.2 / p.size - 1e-12  # the uniform share reaches every pair
    masked = guide.slot_weights(gains, 10.0, 0.2, mask=np.array([0.0, 1, 1, 1]))
    assert masked.reshape(gains.shape)[0].sum() == 0


# ---- what crosses the boundary, reproducibility --------------------------------------------


def test_one_bins_request_per_silo_and_nothing_label_dependent() -> None:
    xs, y = problem()
    params = guided(sample_rate=0.5)
    release = guided_release(params)
    seen = []
    for labels in (y, 1 - y):
        silos = {name: Recording(s) for name, s in silos_of(xs).items()}
        guide.train(silos, labels, params, release, SECRET)
        assert [len(s.requests) for s in silos.values()] == [1, 1]
        seen.append([s.requests for s in silos.values()])
    assert seen[0] == seen[1]
    assert seen[0][0] == [guide.bins_request(2, 32)]


def test_reproducible_from_the_secret_stream_alone_and_it_learns() -> None:
    xs, y = problem(2000)
    params = guided(trees=30, lambda_=1.0)
    release = guided_release(params)

    def fit(secret: SecretRandom, public_seed: int):
        np.random.seed(public_seed)  # a public seed must change nothing
        return guide.train(silos_of(xs), y, params, release, secret).model

    a = fit(SECRET, 0)
    assert a == fit(SECRET, 1)
    assert fit(SecretRandom(b"\x02" * 32), 0) != a
    clear = guide.train(silos_of(xs), y, params, plan_noise(params, epsilon_=math.inf,
                                                            delta=1e-5), SECRET).model
    test_x, test_y = problem(2000, seed=1)
    assert auc(test_y, predict_trees(clear, silos_of(test_x), len(test_y))) > 0.8
    roots = [tree.splits[0] for tree in clear.trees]
    assert sum((s.silo, s.feature) == ("bank", 0) for s in roots) > len(roots) / 2


def test_training_noises_what_it_selects_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage's histograms are drawn with the release's guide noise (none only at eps
    inf)."""
    xs, y = problem(300)
    params = guided()
    calls = []
    real = guide.noisy_histograms

    def spy(*args, **kw):
        calls.append(args[4])
        return real(*args, **kw)

    monkeypatch.setattr(guide, "noisy_histograms", spy)
    release = plan_noise(params, epsilon_=1.0, delta=1e-5)
    guide.train(silos_of(xs), y, params, release, SECRET)
    assert calls == [(release.guide_gradient_noise_multiplier,
                      release.guide_hessian_noise_multiplier)] * 2


# ---- the attack ---------------------------------------------------------------------------


def _histogram_scores(s_g: float, trials: int) -> dict[int, np.ndarray]:
    """Per target label b: the released G in the target's bin less every other person's part
    (the adversary knows all but the target's label), over `trials` releases."""
    rng = np.random.default_rng(11)
    x = rng.uniform(-1, 1, (40, 1))
    binned = guide.Binned((("bank", 0),), bin_index(x, 8))
    others = (rng.random(39) < 0.3).astype(float)
    g_others = 0.3 - others
    known = np.bincount(binned.bins[1:, 0], weights=g_others, minlength=8)
    target_bin = binned.bins[0, 0]
    out = {}
    for b in (0, 1):
        g = np.concatenate([[0.3 - b], g_others])
        h = np.full(40, 0.21)
        scores = np.empty(trials)
        for i in range(trials):
            noise_rng = SecretRandom(hashlib.sha256(f"{b}/{i}".encode()).digest()).generator("n")
            g_hist, _ = guide.noisy_histograms(binned, g, h, 8, (s_g, 2 * s_g), noise_rng)
            scores[i] = -(g_hist[0, target_bin] - known[target_bin])
        out[b] = scores
    return out


def test_attack_on_the_split_histograms_is_exact_without_noise_and_bounded_with_it() -> None:
    eps, delta, trials = 1.0, 1e-5, 200
    clear = _histogram_scores(0.0, 4)
    assert np.allclose(clear[0], -0.3)
    assert np.allclose(clear[1], 0.7)
    # One release at the guide multiplier that costs eps 1 on its own (calibrated by RDP).
    params = guided(trees=1, guide_every=1, guide_sigma=1.0)
    sigma = next(s for s in np.arange(1.0, 20.0, 0.05)
                 if accounted_epsilon(RDP, [(float(s), 1.0, 1)], delta) <= eps)
    assert params.guides == 1
    s_g = sigma * math.sqrt(1 + 1 / 4)  # G's part of the joint multiplier (H twice as hard)
    assert _excess(_histogram_scores(s_g, trials), eps, delta) < 0
    # ... and the check has power: a tenth of the noise fails the bound.
    assert _excess(_histogram_scores(s_g / 10, trials), eps, delta) > 0


def test_the_mass_guide_releases_label_free_counts_once_and_keeps_thresholds_that_cut() -> None:
    rng = np.random.default_rng(2)
    x = np.column_stack([rng.uniform(-0.5, 0.5, 4000), np.full(4000, 0.1)])  # 2nd: constant
    binned = guide.Binned((("bank", 0), ("bank", 1)), bin_index(x, 16))
    exact = guide.noisy_counts(binned, 16, None, rng)
    assert exact.sum(axis=1).tolist() == [4000, 4000]
    cuts = guide.mass_gains(exact, 0.05)
    assert cuts[1].sum() == 0  # a constant column cuts nobody
    assert cuts[0, :3].sum() == 0
    assert cuts[0, -3:].sum() == 0
    assert cuts[0].sum() >= 5
    # With noise, bins under 3 stds count as empty: the constant column still cuts nobody.
    noisy = guide.mass_gains(guide.noisy_counts(binned, 16, 5.0, rng), 0.05)
    assert noisy[1].sum() == 0
    assert noisy[0, :3].sum() == 0
    params = guided(guide_stat="mass", guide_mix=0.0)
    assert params.guides == 1  # counts do not change between stages: one release
    assert guided(guide_stat="leaves").guides == 0  # the released trees only: no release
