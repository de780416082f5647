"""Post-processing of the DP trees' released leaf sums (server/gbdt_dp_post.py): leaf rules
and structure reuse read only released values, and the defaults compute what they did."""

from __future__ import annotations

import numpy as np
import pytest

from clients.silo.gbdt import GbdtSilo
from crypto.secret_random import SecretRandom
from server import gbdt_dp_post
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat, to_flat
from server.gbdt import predict_trees
from server.gbdt_dp import (
    PURPOSE,
    DpTreeParams,
    DpTreesRelease,
    boost,
    draw_structure,
    newton_leaf_values,
    noisy_sums,
    route_all,
)
from server.run_keys import computed_settings, derive_run_key

SECRET = SecretRandom(b"\x03" * 32)


def release_for(params: DpTreeParams, sigma: float = 5.0) -> DpTreesRelease:
    return DpTreesRelease(accountant="rdp", target_epsilon=1.0, epsilon=1.0, delta=1e-5,
                          noise_multiplier=sigma, gradient_noise_multiplier=sigma,
                          hessian_noise_multiplier=sigma, trees=params.trees,
                          sample_rate=params.sample_rate, prior_noise_multiplier=20.0)


def routed(params: DpTreeParams, n: int = 800) -> tuple[dict, np.ndarray, list, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (n, 4))
    y = (rng.random(n) < 1 / (1 + np.exp(-3 * x[:, 0] + 2 * x[:, 2]))).astype(float)
    silos = {"bank": GbdtSilo("bank", x[:, :2], bins=32),
             "telco": GbdtSilo("telco", x[:, 2:], bins=32)}
    structure = draw_structure(silos, params, SECRET.generator(PURPOSE, "", "structure"))
    return silos, y, structure, route_all(silos, structure, n, params.depth)


def test_hierarchical_values_telescope_to_newton_and_collapse_to_the_root() -> None:
    rng = np.random.default_rng(1)
    g, h = rng.normal(0, 5, 16), rng.uniform(0, 30, 16)
    newton = gbdt_dp_post.newton_values(g, h, 10.0)
    np.testing.assert_allclose(gbdt_dp_post.hierarchical_values(g, h, 10.0, 0.0), newton)
    root = -g.sum() / (h.sum() + 10.0)
    np.testing.assert_allclose(gbdt_dp_post.hierarchical_values(g, h, 10.0, 1e12), root)


def test_empirical_bayes_follows_the_signal_and_shrinks_pure_noise() -> None:
    rng = np.random.default_rng(2)
    h = np.full(64, 200.0)
    signal = gbdt_dp_post.Shrinkage(decay=1.0, noise_var=25.0)
    mu = rng.normal(0, 0.5, 64)
    for _ in range(20):
        g = h * mu + rng.normal(0, np.sqrt(h + 25.0))
        signal.update(g, h)
    assert signal.tau2 == pytest.approx(0.25, rel=0.35)
    values = signal.values(h * mu, h, 0.0)
    np.testing.assert_allclose(values, -mu, rtol=0.05)  # large leaves: nearly Newton
    noise = gbdt_dp_post.Shrinkage(decay=1.0, noise_var=25.0)
    for _ in range(20):
        noise.update(rng.normal(0, np.sqrt(h + 25.0)), h)
    assert noise.tau2 < 0.01
    assert np.abs(noise.values(rng.normal(0, 15, 64), h, 0.0)).max() < 0.1


def test_noisy_gain_takes_the_noise_out() -> None:
    rng = np.random.default_rng(3)
    gains = [gbdt_dp_post.noisy_gain(rng.normal(0, 20, 64), np.full(64, 100.0), 400.0, 1.0)
             for _ in range(300)]
    assert abs(np.mean(gains)) < 3 * np.std(gains) / np.sqrt(300)


def test_the_defaults_boost_as_before_and_draw_no_reuse_stream() -> None:
    params = DpTreeParams(trees=12, depth=3, sample_rate=0.5)
    _, y, structure, leaf = routed(params)
    release = release_for(params)
    fitted = boost(leaf, y, structure, params, release, SECRET)
    assert fitted.sources is None
    # The values the trees had before the leaf rules existed: noisy sums, Newton step.
    sample = SECRET.generator(PURPOSE, "", "rows")
    noise = SECRET.generator(PURPOSE, "", "noise")
    margin = np.full(len(y), fitted.model.base_margin)
    for t, tree in enumerate(fitted.model.trees):
        p = 1 / (1 + np.exp(-margin))
        taken = sample.random(len(y)) < params.sample_rate
        values = newton_leaf_values(*noisy_sums((p - y)[taken], (p * (1 - p))[taken],
                                                leaf[t][taken], params, release, noise), params)
        np.testing.assert_array_equal([tree.leaves[7 + i] for i in range(8)], values)
        margin = margin + values[leaf[t]]


def test_reuse_re_releases_routed_structures_and_scores_through_the_silos() -> None:
    params = DpTreeParams(trees=30, depth=3, sample_rate=0.5, reuse=0.5, leaf_rule="hs")
    silos, y, structure, leaf = routed(params)
    fitted = boost(leaf, y, structure, params, release_for(params), SECRET)
    assert fitted.sources is not None
    assert len(fitted.sources) == 30
    assert len(set(fitted.sources)) < 30  # some structures were released again
    assert all(fitted.model.trees[t].splits == structure[s]
               for t, s in enumerate(fitted.sources))
    offset = 7
    margin = np.full(len(y), fitted.model.base_margin)
    for tree, rows in zip(fitted.model.trees, fitted.leaves(leaf), strict=True):
        margin += np.array([tree.leaves[offset + i] for i in range(8)])[rows]
    np.testing.assert_allclose(margin, predict_trees(fitted.model, silos, len(y)), atol=1e-12)


def test_reuse_needs_random_single_trees() -> None:
    with pytest.raises(ValueError, match="reuse"):
        DpTreeParams(reuse=0.2, batch=2, trees=300)
    with pytest.raises(ValueError, match="leaf_rule"):
        DpTreeParams(leaf_rule="median")


def test_the_post_processing_keys_enter_a_run_key_only_when_not_at_their_old_defaults() -> None:
    """A DP tree run at leaf_rule newton without reuse computes what it did before these keys
    existed, so it keeps its key; any other setting puts all of them in the key."""
    dp = {"model.kind": "gbdt", "privacy.epsilon": "1"}
    post = {"gbdt.leaf_rule", "gbdt.hs_kappa", "gbdt.eb_decay", "gbdt.reuse"}
    plain = computed_settings(to_flat(parse_flat(AuthorityConfig, dp)))
    assert not post & set(plain)
    for changed in ({"gbdt.leaf_rule": "hs"}, {"gbdt.reuse": "0.1"}):
        assert post <= set(computed_settings(to_flat(parse_flat(AuthorityConfig,
                                                                {**dp, **changed}))))
    inf = {"model.kind": "gbdt", "privacy.epsilon": "inf", "gbdt.leaf_rule": "hs"}
    assert not post & set(computed_settings(to_flat(parse_flat(AuthorityConfig, inf))))
    with pytest.raises(ConfigError, match="reuse"):
        parse_flat(AuthorityConfig, {**dp, "gbdt.reuse": "0.1", "gbdt.guide_every": "150"})


def test_tree_weights_follow_the_noisy_gains() -> None:
    params = DpTreeParams(trees=12, depth=3, sample_rate=0.5)
    _, y, structure, leaf = routed(params)
    plain = boost(leaf, y, structure, params, release_for(params), SECRET)
    weighted = boost(leaf, y, structure, DpTreeParams(trees=12, depth=3, sample_rate=0.5,
                                                      tree_weight="gain"),
                     release_for(params), SECRET)
    ratios = [np.array(list(b.leaves.values())) / np.array(list(a.leaves.values()))
              for a, b in zip(plain.model.trees, weighted.model.trees, strict=True)]
    per_tree = [r[0] for r in ratios]
    assert all(np.allclose(r, r[0]) for r in ratios)  # one factor per tree
    assert np.mean(per_tree) == pytest.approx(1.0)
    assert min(per_tree) >= 0.0
    assert max(per_tree) > 1.0


def test_the_dp_tree_defaults_changed_so_their_run_key_did() -> None:
    """hessian_noise 4 and reg_lambda 300 (chosen on validation people): a default DP tree run
    computes otherwise than one at the old 2 and 200, so the two keys differ; a non-private
    tree run, whose trees read neither, keeps its key."""
    random = SecretRandom(b"\x05" * 32)
    dp = {"model.kind": "gbdt", "privacy.epsilon": "1"}
    old = {"gbdt.hessian_noise": "2", "gbdt.reg_lambda": "200"}
    new = computed_settings(to_flat(parse_flat(AuthorityConfig, dp)))
    assert (new["gbdt.hessian_noise"], new["gbdt.reg_lambda"]) == (4.0, 300.0)
    assert derive_run_key(random, to_flat(parse_flat(AuthorityConfig, dp))) != derive_run_key(
        random, to_flat(parse_flat(AuthorityConfig, {**dp, **old})))
    inf = {"model.kind": "gbdt", "privacy.epsilon": "inf"}
    assert derive_run_key(random, to_flat(parse_flat(AuthorityConfig, inf))) == derive_run_key(
        random, to_flat(parse_flat(AuthorityConfig, {**inf, "gbdt.hessian_noise": "2"})))
