"""The DP trees in `fedscore run` (server/gbdt_dp_run.py): configuration by mode, the phase over
the silos' real ClientApp (no engine) reproducing server/gbdt_dp.py in process from the same
secret, and its ledger lines checked by the independent accountant."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from clients.protocol import gbdt as msg
from clients.protocol.messages import get_array
from clients.silo.gbdt import GbdtSilo
from crypto.secret_random import SecretRandom
from server import gbdt_dp, gbdt_dp_guide, gbdt_dp_notes, gbdt_dp_run, run_phases
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat, to_flat
from server.federation import FederationError
from server.gbdt import predict_trees
from server.gbdt_dp import fit_dp_trees
from server.gbdt_reasons import leaf_array, released_values
from server.gbdt_run import TreeJob
from server.gbdt_silos import start
from server.ledger import Ledger
from server.run_keys import computed_settings
from simulations.analysis.ledger_verify import consistency, verify
from tests.test_gbdt_wire import _task_identity, announce_run, federation  # noqa: F401

DP = {"model.kind": "gbdt", "privacy.epsilon": "4"}
# Small and fast: RDP without subsampling calibrates in milliseconds (PRV takes seconds).
SMALL = {**DP, "privacy.accountant": "rdp", "gbdt.trees": "12", "gbdt.depth": "3",
         "gbdt.bins": "16", "gbdt.sample_rate": "1"}
SECRET = b"\x07" * 32


def wired_job(federation: tuple, flat: dict, run: str, seed: int,  # noqa: F811
              *, kind: str = "gbdt", logit: tuple[float, float] = (2.0, 1.0)) -> TreeJob:
    """A run's training job on the fixture's federation (fed, grid, xs, ...), announced to its
    silos with their sent messages cleared: `flat`'s configuration, a 60/20/20 split and
    labels y ~ Bernoulli(sigmoid(a x + b)) of the payments silo's first column, (a, b) =
    `logit`, both drawn from `seed`."""
    fed, grid, xs = federation[:3]
    cfg = parse_flat(AuthorityConfig, flat)
    n = len(next(iter(xs.values())))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    train, val = np.sort(order[: n * 6 // 10]), np.sort(order[n * 6 // 10: n * 8 // 10])
    slope, shift = logit
    y = (rng.random(n) < 1 / (1 + np.exp(-slope * xs["payments"][:, 0] - shift))).astype(np.int8)
    announce_run(grid, run, kind, cfg.privacy.epsilon)
    grid.sent.clear()
    return TreeJob(fed, cfg, run, train, val, n, y, y.astype(np.float64))


def dp_tree_phase(job: TreeJob, grid, ledger_dir: Path, secret: bytes) -> tuple:
    """The DP trees' training phase of `job` over the silos' handlers, with its ledger in
    `ledger_dir`: (result, calibration, what it spent, the route messages it sent)."""
    result, platt, spent = gbdt_dp_run.train_and_calibrate(
        job, run_phases.PhaseTimer(None), Ledger(ledger_dir), SecretRandom(secret))
    routes = [m for m in grid.sent if m.metadata.message_type.endswith(msg.ROUTE)]
    return result, platt, spent, routes


# ---- configuration -----------------------------------------------------------------------


def test_dp_trees_take_gbdt_dps_defaults_unless_keys_are_given() -> None:
    cfg = parse_flat(AuthorityConfig, DP)
    assert gbdt_dp_run.dp_trees(cfg)
    params = gbdt_dp_run.dp_params(cfg)
    assert (params.trees, params.depth, params.bins, params.lr, params.lambda_) == (
        300, 6, 32, 0.5, 300.0)
    assert (params.sample_rate, params.batch, params.hessian_noise, params.max_leaf) == (
        0.3, 1, 4.0, 1.0)
    given = parse_flat(AuthorityConfig, {**DP, "gbdt.trees": "40", "gbdt.lr": "0.2"})
    assert (given.gbdt.trees, given.gbdt.lr, given.gbdt.reg_lambda) == (40, 0.2, 300.0)
    # config.json holds the values run, and reads back to the same configuration.
    assert parse_flat(AuthorityConfig, to_flat(given)) == given


def test_dp_trees_refuse_what_means_nothing_for_them() -> None:
    with pytest.raises(ConfigError, match="nothing to encrypt"):
        parse_flat(AuthorityConfig, {**DP, "gbdt.protection": "he"})
    with pytest.raises(ConfigError, match="depth of 1 to 10"):
        parse_flat(AuthorityConfig, {**DP, "gbdt.depth": "11"})
    with pytest.raises(ConfigError, match=r"divisor of gbdt\.trees"):
        parse_flat(AuthorityConfig, {**DP, "gbdt.trees": "10", "gbdt.batch": "3"})
    with pytest.raises(ConfigError, match="sample_rate"):
        parse_flat(AuthorityConfig, {**DP, "gbdt.sample_rate": "0"})


def test_the_dp_settings_leave_a_non_private_tree_runs_key_alone() -> None:
    """A tree run at epsilon inf has none of the DP trees' own settings in its key (its
    binning and min_child_weight are its own, quantile and 20 since they measured better);
    a DP tree run keeps the key it had before those: no binning, min_child_weight 1."""
    flat = to_flat(parse_flat(AuthorityConfig, {"model.kind": "gbdt", "privacy.epsilon": "inf"}))
    gbdt = {k: v for k, v in computed_settings(flat).items() if k.startswith("gbdt.")}
    assert gbdt == {"gbdt.trees": 50, "gbdt.depth": 5, "gbdt.bins": 32, "gbdt.lr": 0.1,
                    "gbdt.reg_lambda": 1.0, "gbdt.min_child_weight": 20.0,
                    "gbdt.protection": "rr", "gbdt.binning": "quantile"}
    dp = computed_settings(to_flat(parse_flat(AuthorityConfig, DP)))
    assert dp["gbdt.sample_rate"] == 0.3
    assert dp["gbdt.min_child_weight"] == 1.0
    assert "gbdt.binning" not in dp


def test_the_runs_sgd_machinery_sees_no_dp_for_the_dp_trees() -> None:
    cfg = parse_flat(AuthorityConfig, DP)
    idle = gbdt_dp_run.sgd_config(cfg)
    assert not idle.privacy.dp_sgd
    assert not idle.privacy.label_dp
    assert idle.gbdt == cfg.gbdt
    mlp = parse_flat(AuthorityConfig, {})
    assert gbdt_dp_run.sgd_config(mlp) is mlp


# ---- the phase over the silos' real handlers ---------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"gbdt.reuse": "0.3"}], ids=["random", "reuse"])
def test_the_phase_reproduces_the_in_process_dp_trees_and_its_ledger_verifies(
        federation, tmp_path: Path, extra: dict) -> None:  # noqa: F811 (the fixture)
    """One route message per silo for every tree and person; the same margins as
    `fit_dp_trees` in process from the same secret on the training rows (with structure
    reuse too: everyone scored through the structure each tree re-released); ledger lines the
    independent accountant agrees with, within the target, eps_model = the ledger's."""
    fed, grid, xs = federation
    job = wired_job(federation, {**SMALL, **extra}, "dpkey1", 3)
    cfg, train, y, n = job.cfg, job.train, job.y, job.n_positions
    result, platt, spent, routes = dp_tree_phase(job, grid, tmp_path, SECRET)
    assert len(routes) == len(xs)
    assert result.round_trips == 2

    # In process, from the same secret: the same structure, prior, samples and noise.
    params = gbdt_dp_run.dp_params(cfg)
    budget = gbdt_dp_run.plan_budget(cfg, tuple(fed.silos), len(train), params)
    # The fixture's matrices are in STANDARD_UNITS; the DP trees' silos bin x / DP_UNITS.
    xs = {s: x * msg.STANDARD_UNITS / msg.DP_UNITS for s, x in xs.items()}
    local = {s: GbdtSilo(s, x[train], bins=params.bins) for s, x in xs.items()}
    trees = fit_dp_trees(local, y[train], params, epsilon=budget.target,
                         delta=budget.deltas.accountant, rng=SecretRandom(SECRET),
                         purpose="dpkey1",
                         prefix=gbdt_dp_run.statistics_history(budget.statistics))
    everyone = {s: GbdtSilo(s, x, bins=params.bins) for s, x in xs.items()}
    np.testing.assert_allclose(result.logits, predict_trees(trees.model, everyone, n),
                               rtol=0, atol=1e-12)
    # The bias the points start from: the noisy prior and every root's released value.
    roots = sum(released_values(leaf_array(tree, params.depth), sums, params)[0]
                for tree, sums in zip(trees.model.trees, trees.sums, strict=True))
    assert result.bias == pytest.approx(trees.model.base_margin + roots)
    if extra:  # some structure was released twice, so the leaves were remapped
        assert len({repr(t.splits) for t in trees.model.trees}) < len(trees.model.trees)
    assert spent["epsilon"]["model_by_population"]["train"] == trees.release.epsilon

    assert_dp_model_ledger_verifies(tmp_path, cfg, spent, steps=0, round_trips=2)
    assert math.isclose(spent["delta"], spent["delta_accountant"] + spent["delta_thresholds"])
    assert platt.a != 1.0 or platt.b != 0.0  # the DP calibration ran (its line is checked)


def test_a_dp_tree_run_says_its_epsilon_and_that_no_label_budget_is_spent() -> None:
    out = {"model": {"bias": 0.0}, "epsilon": {"model": 0.98}, "delta": 1e-6,
           "authority_sees": ["the sum"]}
    gbdt_dp_notes.annotate(out, parse_flat(AuthorityConfig, DP))
    assert out["model_kind"] == "gbdt"
    assert out["gbdt"]["model_epsilon"] == 0.98
    assert "not spent" in out["gbdt"]["label_protection"]
    assert out["gbdt"]["trees"] == 300
    assert out["gbdt"]["sample_rate"] == 0.3
    assert not any("the sum" in line for line in out["authority_sees"])


def test_the_run_summary_says_the_dp_trees_spend_no_label_budget() -> None:
    from simulations.cli.run import privacy_rows

    rows = dict(privacy_rows({"model_kind": "gbdt", "epsilon": {"model": 0.99, "label": None}}))
    assert any("not spent" in v for v in rows.values())
    assert "0.990" in rows.values()
    plain = dict(privacy_rows({"model_kind": "gbdt", "epsilon": {"model": None, "label": None}}))
    assert any("reads the training labels" in v for v in plain.values())


def test_a_silo_refuses_units_outside_their_range(federation) -> None:  # noqa: F811
    fed, _, _ = federation
    for bad in (0.0, math.inf, math.nan):
        with pytest.raises(FederationError, match="units must lie"):
            start(fed, "dpkey2", 8, np.arange(20), units=bad)


def test_the_guided_phase_reproduces_the_in_process_trees_and_its_ledger_verifies(
        federation, tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """gbdt.guide_every > 0: one route message per silo asking for every (column, bin) pair
    of its own columns, nothing else; the same margins as server/gbdt_dp_guide.py in process
    from the same secret; the split histograms' line in a ledger that verifies."""
    fed, grid, xs = federation
    job = wired_job(federation, {**SMALL, "gbdt.guide_every": "6", "gbdt.guide_sigma": "20"},
                    "dpkey3", 4)
    cfg, train, y, n = job.cfg, job.train, job.y, job.n_positions
    result, _, spent, routes = dp_tree_phase(job, grid, tmp_path, SECRET)
    assert len(routes) == len(xs)
    assert result.round_trips == 2
    params = gbdt_dp_run.dp_params(cfg)
    assert params.guides == 2
    for sent in routes:  # every (column, bin) pair of the silo, for every person
        features = get_array(sent, "features", np.int64, 1)
        bins = get_array(sent, "bins", np.int64, 1)
        assert len(features) == len(bins) == (features.max() + 1) * (params.bins - 1)
        assert set(bins.tolist()) == set(range(params.bins - 1))
        assert len(get_array(sent, "positions", np.int64, 1)) == n

    budget = gbdt_dp_run.plan_budget(cfg, tuple(fed.silos), len(train), params)
    xs = {s: x * msg.STANDARD_UNITS / msg.DP_UNITS for s, x in xs.items()}
    local = {s: GbdtSilo(s, x[train], bins=params.bins) for s, x in xs.items()}
    trees = gbdt_dp_guide.train(local, y[train], params, budget.release, SecretRandom(SECRET),
                                purpose="dpkey3")
    everyone = {s: GbdtSilo(s, x, bins=params.bins) for s, x in xs.items()}
    np.testing.assert_allclose(result.logits, predict_trees(trees.model, everyone, n),
                               rtol=0, atol=1e-12)
    lines = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [line["purpose"] for line in lines].count("dp-trees split histograms") == 1
    assert_dp_model_ledger_verifies(tmp_path, cfg, spent, steps=0, round_trips=2)
    # The guided trees keep their released leaf sums too (the reasons' only input): every
    # leaf's value is their Newton step, and the bias starts from every root's.
    for tree, sums in zip(trees.model.trees, trees.sums, strict=True):
        np.testing.assert_allclose(gbdt_dp.newton_leaf_values(sums[0], sums[1], params),
                                   leaf_array(tree, params.depth))
    roots = sum(released_values(leaf_array(tree, params.depth), sums, params)[0]
                for tree, sums in zip(trees.model.trees, trees.sums, strict=True))
    assert result.bias == pytest.approx(trees.model.base_margin + roots)


def assert_dp_model_ledger_verifies(run_dir: Path, cfg: AuthorityConfig, spent: dict, *,
                                    steps: int, round_trips: int) -> None:
    """A DP model phase's ledger, beside the config and metrics a run writes, verifies
    independently: one budget per population, the train one as reported, the model's epsilon
    the larger, within the fixture's target of 4; no label budget (no RR drawn)."""
    (run_dir / "config.json").write_text(json.dumps(to_flat(cfg)))
    (run_dir / "metrics.json").write_text(json.dumps({**spent, "training_steps": steps,
                                                      "round_trips": round_trips}))
    checks = verify(run_dir)
    assert {c.budget for c in checks} == {"model/train", "model/val"}
    assert all(c.ok for c in checks), checks
    assert consistency(run_dir, checks) == []
    by = {c.budget: c.reported for c in checks}
    assert by["model/train"] == spent["epsilon"]["model_by_population"]["train"]
    assert max(by.values()) == spent["epsilon"]["model"] <= 4.0
    assert spent["epsilon"]["label"] is None


def test_the_guide_settings_enter_a_run_key_only_when_the_trees_are_guided() -> None:
    """A DP tree run with gbdt.guide_every=0 (the default) computes what it did before the
    guided trees existed, so it keeps its key; a guided run's key holds every guide key."""
    plain = computed_settings(to_flat(parse_flat(AuthorityConfig, DP)))
    assert not any(k.startswith("gbdt.guide_") for k in plain)
    guided = computed_settings(to_flat(parse_flat(AuthorityConfig,
                                                  {**DP, "gbdt.guide_every": "150"})))
    assert {k for k in guided if k.startswith("gbdt.guide_")} == {
        "gbdt.guide_every", "gbdt.guide_sigma", "gbdt.guide_beta", "gbdt.guide_mix",
        "gbdt.guide_stat", "gbdt.guide_bins", "gbdt.guide_share"}
    with pytest.raises(ConfigError, match="guide_bins"):
        parse_flat(AuthorityConfig, {**DP, "gbdt.guide_bins": "5"})
