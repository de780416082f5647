"""The DP trees' first additive stage (server/gbdt_dp_init.py, `gbdt.init=additive`): one
accountant over the stage and the trees, the trees boosting from the stage's margin, and
reason credits that add up to the score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy.optimize import brentq
from scipy.stats import norm

from clients.protocol import gbdt as msg
from clients.silo.gbdt import GbdtSilo
from crypto.secret_random import SecretRandom
from server import gbdt_dp_init, gbdt_dp_run, scorecard_dp
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat, to_flat
from server.gbdt import predict_trees
from server.gbdt_dp import PURPOSE, DpTreeParams, boost, draw_structure, route_all, train_dp_trees
from server.gbdt_reasons import Credits, dp_credits
from server.ledger_lines import GaussianRelease
from server.run_keys import computed_settings
from tests.test_gbdt_dp_wire import (
    SMALL,
    assert_dp_model_ledger_verifies,
    dp_tree_phase,
    wired_job,
)
from tests.test_gbdt_wire import _task_identity, announce_run, federation  # noqa: F401

SECRET = SecretRandom(b"\x07" * 32)
SECRET_RUN = b"\x07" * 32
PREFIX = ((12.0, 1.0, 1), (30.0, 1.0, 1))  # two silos' preparation statistics


def _gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle and Wang (ICML 2018): the exact epsilon of ONE Gaussian mechanism."""
    def gap(eps: float) -> float:
        return (norm.cdf(-eps * sigma + 0.5 / sigma)
                - math.exp(eps) * norm.cdf(-eps * sigma - 0.5 / sigma) - delta)
    return float(brentq(gap, 1e-9, 50.0))


def _plan(share: float = 0.4, trees: int = 8, sample_rate: float = 1.0
          ) -> tuple[DpTreeParams, gbdt_dp_init.InitParams, gbdt_dp_init.InitTreesRelease]:
    params = DpTreeParams(trees=trees, depth=3, sample_rate=sample_rate, accountant="rdp")
    init = gbdt_dp_init.InitParams(
        share=share, card=scorecard_dp.DpScorecardParams(accountant="rdp"))
    return params, init, gbdt_dp_init.plan_noise(params, init, epsilon_=1.0, delta=1e-6,
                                                 prefix=PREFIX)


def test_the_runs_combined_epsilon_is_the_accountants_over_both_mechanisms() -> None:
    """Known answer: with the trees reading everyone (sample rate 1), the statistics, the
    stage's counts and steps and the trees' leaf sums are all Gaussian mechanisms on every
    person, so together ONE Gaussian of multiplier (sum 1/sigma_i^2)^(-1/2), whose epsilon
    is known in closed form. dp-accounting's PLD over the prefix and the ledger lines gives
    it; the ledger's last line (the run's combined epsilon) is at least it and within the
    target; the stage took its share of the budget and the trees released no prior."""
    params, init, release = _plan()
    lines = release.ledger_lines()
    assert [ln.purpose for ln in lines] == [gbdt_dp_init.COUNTS_PURPOSE,
                                            gbdt_dp_init.STEPS_PURPOSE, "dp-trees leaf sums"]
    assert [(ln.steps, ln.sample_rate) for ln in lines] == [(1, 1.0), (init.card.steps, 1.0),
                                                            (params.trees, 1.0)]
    stage = release.stage
    inverse = (sum(1 / s**2 for s, _, _ in PREFIX) + 1 / stage.count_noise_multiplier**2
               + stage.steps / stage.noise_multiplier**2
               + params.trees / release.noise_multiplier**2)
    exact = _gaussian_epsilon(inverse**-0.5, 1e-6)
    pld = pld_privacy_accountant.PLDAccountant()
    for sigma, _, _ in PREFIX:
        pld.compose(GaussianRelease(party="silo", population="all", purpose="statistics",
                                    noise_multiplier=sigma, sample_rate=1.0, steps=1,
                                    round=0, delta=1e-6, accountant="rdp",
                                    epsilon=0.0).dp_event())
    for line in lines:
        pld.compose(line.dp_event())
    assert pld.get_epsilon(1e-6) == pytest.approx(exact, rel=0.01)
    assert exact <= lines[-1].epsilon == release.epsilon <= 1.0 * 1.005
    assert lines[0].epsilon < lines[1].epsilon < lines[2].epsilon
    assert not release.trees.priors
    assert release.trees.prior_noise_multiplier == 0
    # The stage's share of the budget in 1/sigma^2: that of the single Gaussian which would
    # spend all of it after the prefix.
    whole = scorecard_dp.calibrate_sigma(1.0, 1e-6, 1.0, 1, "rdp", prefix=list(PREFIX))
    stage_inverse = 1 / stage.count_noise_multiplier**2 + stage.steps / stage.noise_multiplier**2
    assert stage_inverse == pytest.approx(init.share / whole**2, rel=1e-9)


def test_a_larger_share_for_the_stage_leaves_more_noise_on_the_trees() -> None:
    _, _, small = _plan(share=0.2)
    _, _, large = _plan(share=0.6)
    assert small.stage.noise_multiplier > large.stage.noise_multiplier
    assert small.noise_multiplier < large.noise_multiplier
    assert small.epsilon <= 1.005
    assert large.epsilon <= 1.005


def _silos(n: int = 600) -> tuple[dict[str, GbdtSilo], np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (n, 4))
    y = (rng.random(n) < 1 / (1 + np.exp(-2 * x[:, 0] + 2 * x[:, 2]))).astype(float)
    return {"bank": GbdtSilo("bank", x[:, :2], bins=16),
            "telco": GbdtSilo("telco", x[:, 2:], bins=16)}, y


def test_the_trees_boost_from_the_stage_and_the_credits_add_up_to_the_margin() -> None:
    silos, y = _silos()
    params = DpTreeParams(trees=6, depth=3, bins=16, sample_rate=1.0, accountant="rdp")
    card = scorecard_dp.DpScorecardParams(card=scorecard_dp.ScorecardParams(bins=16),
                                          accountant="rdp")
    init = gbdt_dp_init.InitParams(share=0.4, card=card)
    release = gbdt_dp_init.plan_noise(params, init, epsilon_=2.0, delta=1e-5)
    pre = scorecard_dp.route_pre_bins(silos, 16)
    stage = gbdt_dp_init.fit_stage(pre, y, init, release, SECRET, purpose="run")
    first = scorecard_dp.margins(stage, pre)
    structure = draw_structure(silos, params, SECRET.generator(PURPOSE, "run", "structure"))
    leaf = route_all(silos, structure, len(y), params.depth)
    trees = boost(leaf, y, structure, params, release.trees, SECRET, purpose="run",
                  init=first)
    assert trees.model.base_margin == 0.0
    with pytest.raises(ValueError, match="prior"):
        boost(leaf, y, structure, params, release.trees, SECRET, purpose="run")
    offset = 2**params.depth - 1
    margin = first + sum(np.array([tree.leaves[offset + i] for i in range(2**params.depth)])
                         [leaf[t]] for t, tree in enumerate(trees.model.trees))
    credits, bias = dp_credits(trees, params, leaf, {"bank": 2, "telco": 2})
    tables, intercept = gbdt_dp_init.stage_credits(stage, pre)
    for name, table in tables.items():
        credits.add_columns(name, table)
    total = bias + intercept + sum(c for c in credits.contributions().values())
    np.testing.assert_allclose(total, margin, atol=1e-9)
    # The stage carries the additive signal: its coefficients' signs follow the data's.
    assert np.corrcoef(first, y)[0, 1] > 0.2
    with pytest.raises(ValueError, match="one column"):
        Credits({"bank": 2}, len(y)).add_columns("bank", np.zeros((len(y), 3)))


def test_the_init_keys_enter_a_run_key_only_with_a_stage() -> None:
    dp = {"model.kind": "gbdt", "privacy.epsilon": "1"}
    keys = {"gbdt.init", "gbdt.init_share"}
    assert not keys & set(computed_settings(to_flat(parse_flat(AuthorityConfig, dp))))
    staged = {**dp, "gbdt.init": "additive"}
    assert keys <= set(computed_settings(to_flat(parse_flat(AuthorityConfig, staged))))
    inf = {**staged, "privacy.epsilon": "inf"}
    assert not keys & set(computed_settings(to_flat(parse_flat(AuthorityConfig, inf))))
    with pytest.raises(ConfigError, match=r"gbdt\.init"):
        parse_flat(AuthorityConfig, {**dp, "gbdt.init": "scorecard"})
    with pytest.raises(ConfigError, match="guide_every"):
        parse_flat(AuthorityConfig, {**staged, "gbdt.guide_every": "150"})


def test_the_staged_phase_reproduces_the_in_process_model_and_its_ledger_verifies(
        federation, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """gbdt.init=additive in a run: two route messages per silo (every threshold of every
    column on the stage's scale, then the trees' splits), four round trips; the margins of
    the stage and the trees fitted in process from the same secret; a ledger with the
    stage's two lines and no prior that the independent accountant verifies."""
    fed, grid, xs = federation
    job = wired_job(federation, {**SMALL, "gbdt.init": "additive"}, "dpkey5", 5)
    cfg, train, y, n = job.cfg, job.train, job.y, job.n_positions
    result, _, spent, routes = dp_tree_phase(job, grid, tmp_path, SECRET_RUN)
    assert len(routes) == 2 * len(xs)
    assert result.round_trips == 4

    params, init = gbdt_dp_run.dp_params(cfg), gbdt_dp_run.init_params(cfg)
    assert init is not None
    budget = gbdt_dp_run.plan_budget(cfg, tuple(fed.silos), len(train), params, init)
    bins = init.card.card.bins
    # The fixture's matrices are in STANDARD_UNITS, the stage's scale.
    pre = scorecard_dp.route_pre_bins({s: GbdtSilo(s, x, bins=bins) for s, x in xs.items()},
                                      bins)
    stage = gbdt_dp_init.fit_stage({s: b[train] for s, b in pre.items()}, y[train].astype(
        float), init, budget.release, SecretRandom(SECRET_RUN), purpose="dpkey5")
    first = scorecard_dp.margins(stage, pre)
    dp_x = {s: x * msg.STANDARD_UNITS / msg.DP_UNITS for s, x in xs.items()}
    local = {s: GbdtSilo(s, x[train], bins=params.bins) for s, x in dp_x.items()}
    trees = train_dp_trees(local, y[train].astype(float), params, budget.release.trees,
                           SecretRandom(SECRET_RUN), purpose="dpkey5", init=first[train])
    everyone = {s: GbdtSilo(s, x, bins=params.bins) for s, x in dp_x.items()}
    np.testing.assert_allclose(result.logits, first + predict_trees(trees.model, everyone, n),
                               rtol=0, atol=1e-12)
    lines = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    purposes = [line["purpose"] for line in lines]
    assert purposes[-4:] == [gbdt_dp_init.COUNTS_PURPOSE, gbdt_dp_init.STEPS_PURPOSE,
                             "dp-trees leaf sums", "calibration"]
    assert "prior" not in purposes
    assert_dp_model_ledger_verifies(tmp_path, cfg, spent, steps=0, round_trips=4)
    assert spent["epsilon"]["model_by_population"]["train"] == budget.release.epsilon
