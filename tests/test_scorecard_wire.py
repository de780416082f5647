"""`model.kind=scorecard` in `fedscore run` (issue 20 item 2): its configuration, and the whole
protocol over the silos' real ClientApp (no engine) against the in-process scorecard of
simulations/run/scorecard.py on the same inputs."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from clients.protocol import gbdt as gbdt_msg
from clients.protocol import messages as m
from clients.protocol.gbdt import LEVEL, START, EncryptedGradients, Gradients
from clients.protocol.scorecard import (
    LOGITS,
    SCORE,
    TABLE_FILE,
    WOE,
    PartialLogitsRequest,
    WoeTables,
    pack_tables,
)
from clients.silo import gbdt_handlers
from clients.silo.data import load_silo
from clients.silo.gbdt import GbdtSilo
from clients.silo.policy import SiloPolicy
from clients.silo.scorecard import ScorecardSilo
from crypto.secret_random import SecretRandom
from server import gbdt_dp_run, run_phases, scorecard_dp, scorecard_dp_run
from server.config import AuthorityConfig, ConfigError, ScoreConfig
from server.config_keys import parse_flat
from server.federation import Federation, FederationError
from server.gbdt_silos import start
from server.label_dp import flip_probability, keep_probability, randomized_response
from server.ledger import Ledger
from server.scorecard import ScorecardParams, Silos, fit_scorecard, points, predict_margins
from server.scorecard_run import UNITS, ScorecardSilos, annotate, calibrated
from server.scoring import Platt, to_score
from simulations.run.scorecard import fit_vertical_scorecard, scored_silos, scores, silos_for
from tests.test_gbdt import by_silo, credit_like
from tests.test_gbdt_dp_wire import assert_dp_model_ledger_verifies, wired_job
from tests.test_gbdt_wire import (
    OPEN,
    AppGrid,
    aligned_federation,
    announce_run,
    ask,
    level_request,
    refused,
    tree_start,
)

CARD = {"model.kind": "scorecard", "privacy.epsilon": "inf"}
# The DP scorecard, small and fast: RDP without subsampling calibrates in milliseconds; eps 4
# so that the validation people of the fixture pay for a DP calibration (its ledger line).
DP_FAST = {"model.kind": "scorecard", "privacy.epsilon": "4", "privacy.accountant": "rdp"}
SECRET = b"\x0b" * 32


# ---- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "words"), [
    ("topology", "horizontal", "vertical only"),
    ("privacy.transcript_sigma", "1", "transcript_sigma=0"),
])
def test_scorecard_settings_are_checked_at_the_edge(key: str, value: str, words: str) -> None:
    for epsilon in ("inf", "1"):  # the same refusals with and without DP
        with pytest.raises(ConfigError, match=words):
            parse_flat(AuthorityConfig, {**CARD, "privacy.epsilon": epsilon, key: value})


def test_a_scorecard_run_is_accepted_without_dp_and_says_what_it_is() -> None:
    cfg = parse_flat(AuthorityConfig, {**CARD, "privacy.label_epsilon": "1.5"})
    assert cfg.model.kind == "scorecard"
    assert math.isinf(cfg.privacy.epsilon)
    out = {"model": {"bias": 0.0}, "authority_sees": ["the sum"], "training_steps": 17,
           "history": [{"bins": 120, "inputs": 48, "inputs_used": 24}]}
    annotate(out, cfg)
    assert out["model"]["kind"] == out["model_kind"] == "scorecard"
    section = out["scorecard"]
    assert (section["steps"], section["bins"], section["inputs_used"]) == (17, 120, 24)
    assert section["model_epsilon"] == "inf"
    assert "privacy.label_epsilon=1.5" in section["label_protection"]
    assert "the sum" not in out["authority_sees"]
    assert any("partial logit" in line for line in out["authority_sees"])
    mlp = {"model": {"bias": 0.0}, "authority_sees": ["the sum"]}
    annotate(mlp, parse_flat(AuthorityConfig, {}))
    assert mlp == {"model": {"bias": 0.0}, "authority_sees": ["the sum"]}


# ---- the Flower messages against the in-process scorecard ---------------------------------


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps every message with the running task's identity; outside an app, set one.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Federation, AppGrid, dict[str, np.ndarray], Path]:
    """The trees' aligned federation (tests/test_gbdt_wire.py), in the scorecard's units."""
    root = tmp_path_factory.mktemp("cardwire") / "parties"
    fed, grid, xs = aligned_federation(root)
    return fed, grid, {s: x / UNITS for s, x in xs.items()}, root  # what the silo bins


@pytest.mark.parametrize("label_epsilon", [math.inf, 2.0])
def test_flower_scorecard_equals_the_in_process_scorecard(federation, label_epsilon: float
                                                          ) -> None:
    """Same bins, WoE, coefficients and steps as simulations/run/scorecard.py on the same
    aligned matrices and labels (clean, or RR with the forward correction); then everyone's
    margins, the silos' tables on disk and their reason codes, and scores that are the base
    points plus the points of each person's bins."""
    fed, grid, xs, root = federation
    n = len(next(iter(xs.values())))
    rng = np.random.default_rng(3)
    train = np.sort(rng.choice(n, size=n * 7 // 10, replace=False))
    val = np.setdiff1d(np.arange(n), train)
    y = (rng.random(n) < 1 / (1 + np.exp(2 - 2 * xs["payments"][:, 0]))).astype(np.float64)
    y_view = randomized_response(y.astype(np.int8), label_epsilon, rng).astype(np.float64)
    rho = flip_probability(label_epsilon)
    run = "card" + ("inf" if math.isinf(label_epsilon) else "rr")
    params = ScorecardParams()
    announce_run(grid, run, "scorecard")
    features = start(fed, run, params.bins, train, units=UNITS)
    silos = ScorecardSilos(fed, features)
    grid.sent.clear()
    model = fit_scorecard(cast(Silos, silos), y_view[train], params, rho)
    local = fit_vertical_scorecard({s: x[train] for s, x in xs.items()}, y_view[train], rho=rho)
    assert model.steps == local.steps > 2
    for s in xs:
        for ours, theirs in zip(model.tables[s], local.tables[s], strict=True):
            np.testing.assert_array_equal(ours.cuts, theirs.cuts)
            np.testing.assert_allclose(ours.woe, theirs.woe, rtol=0, atol=1e-12)
        np.testing.assert_allclose(model.coef[s], local.coef[s], rtol=0, atol=1e-9)
        assert (model.coef[s] <= 0).all()
    assert model.intercept == pytest.approx(local.intercept, abs=1e-9)
    # One message per silo per round: counts, tables, the first logits, then per step a
    # histogram and its trials (one, unless the step is halved).
    assert len(grid.sent) == silos.round_trips * len(xs)
    if math.isinf(label_epsilon):  # (the RR labels of 700 people stop it at 50 steps)
        assert model.steps < params.iterations
        assert silos.round_trips <= 3 + model.steps * 3

    everyone = np.arange(n, dtype=np.int64)
    partial = silos.partial_logits_at(model.coef, everyone)
    margin = model.intercept + sum(partial.values(), np.zeros(n))
    platt = Platt.fit(margin[val], y[val])
    cfg = ScoreConfig()
    base, in_process = scored_silos(calibrated(model, platt), xs, cfg)
    np.testing.assert_allclose(margin, predict_margins(local, silos_for(xs, params.bins), n),
                               rtol=0, atol=1e-8)
    _, per_silo = points(calibrated(model, platt), cfg)
    explained = silos.finish(model, per_silo, everyone, 4)
    published = to_score(platt(margin), cfg)
    assert np.abs(published.astype(int) - scores(base, in_process).astype(int)).max() <= 1
    for s, silo in in_process.items():
        why = explained[s]
        np.testing.assert_allclose(why.delta + why.reference, partial[s], atol=1e-4)
        index, _ = silo.reasons(4)
        np.testing.assert_array_equal(why.index, index)
        with (root / s / "scorecards" / run / "scorecard.csv").open() as f:
            table = list(csv.DictReader(f))
        assert len(table) == sum(len(t.woe) for t in model.tables[s])
        np.testing.assert_allclose([float(r["points"]) for r in table],
                                   np.concatenate(per_silo[s]))
        # Named by the silo's own columns, with ranges in its own units.
        assert {r["column"] for r in table} == set(load_silo(root / s, s, None).columns)
        assert any(math.isfinite(float(r["raw_high"])) for r in table)
        # Ranges on the prepared scale: the pre-bins span +-UNITS of it, not +-1.
        first = model.tables[s][0]
        highs = [float(r["high"]) for r in table if r["feature"] == "0"]
        np.testing.assert_allclose(highs[:-1], UNITS * (-1 + 2 * (first.cuts + 1) / params.bins))


def _request(weights: np.ndarray) -> PartialLogitsRequest:
    return PartialLogitsRequest(round=0, weights=weights)


def test_silo_handlers_refuse_malformed_requests(federation) -> None:
    fed, grid, xs, _ = federation
    silos = ScorecardSilos(fed, {s: x.shape[1] for s, x in xs.items()})
    name = fed.silos[0]
    announce_run(grid, "cardbad", "scorecard")
    start(fed, "cardbad", 8, np.arange(20), units=UNITS)
    with pytest.raises(FederationError, match="no WoE tables for this run yet"):
        silos.partial_logits_at({s: np.zeros(x.shape[1]) for s, x in xs.items()}, np.arange(5))
    model = fit_vertical_scorecard({s: x[:200] for s, x in xs.items()},
                                   (np.arange(200) % 5 == 0).astype(float), bins=8)
    tables = model.tables
    wrong = {s: WoeTables(features=tables[s][:-1]) for s in xs}  # a feature short
    with pytest.raises(FederationError, match="one WoE table per feature"):
        silos.woe_tables_all(wrong)
    silos.woe_tables_all({s: WoeTables(features=tables[s]) for s in xs})
    with pytest.raises(FederationError, match="one weight per feature"):
        silos.partial_logits_all({name: _request(np.zeros(999))})
    with pytest.raises(FederationError, match="NaN or infinite"):
        silos.partial_logits_all({name: _request(np.full(xs[name].shape[1], np.nan))})
    short = {s: tuple(p[:-1] if i == 0 else p for i, p in enumerate(t))
             for s, t in points(model, ScoreConfig())[1].items()}
    with pytest.raises(FederationError, match="one value per merged bin"):
        silos.finish(model, short, np.arange(5), 0)


# ---- a deviating authority: the run's announced mode and the silo's policy ----------------


def _policy(root: Path, **values) -> None:
    SiloPolicy(**values).write(root / "payments")


@pytest.fixture(scope="module")
def card(federation) -> tuple:
    """payments' WoE tables over 300 training people and their points per merged bin."""
    xs = federation[2]
    model = fit_vertical_scorecard({"payments": xs["payments"][:300]},
                                   (np.arange(300) % 5 == 0).astype(float), bins=8)
    return model.tables["payments"], np.concatenate(points(model, ScoreConfig())[1]["payments"])


def _held_tables(grid: AppGrid, card: tuple, run: str) -> tuple:
    """An announced scorecard run on 300 training people, with `card`'s WoE tables held by
    payments (node 1)."""
    announce_run(grid, run, "scorecard")
    train = np.arange(300, dtype=np.int64)
    assert not ask(grid, 1, START, tree_start(run, train, bins=8)).has_error()
    assert not ask(grid, 1, WOE, m.make_content(None, **pack_tables(card[0]))).has_error()
    return card


def test_scorecard_reason_codes_beyond_the_policy_are_refused(federation, card) -> None:
    """`explain` for the scorecard: the authority asks four reason codes per person with the
    points tables; a silo allowing none refuses before it writes or computes anything."""
    _, grid, xs, root = federation
    _, table_points = _held_tables(grid, card, "cardwhy")
    weights = -np.ones(xs["payments"].shape[1])
    everyone = np.arange(len(xs["payments"]), dtype=np.int64)
    asked = m.make_content({"reasons": 4}, weights=weights, positions=everyone,
                           points=table_points)
    try:
        _policy(root, min_group=1, explain=4, require_secure_sum=False)  # the mechanism
        reply = ask(grid, 1, SCORE, asked)
        assert m.get_array(reply, "reason_index", np.int16, 2).shape == (len(everyone), 4)
        _policy(root, min_group=1, require_secure_sum=False)  # the default explain=0
        refused(ask(grid, 1, SCORE, asked), "'explain'", "4 reason codes asked, this silo "
                "allows 0")
    finally:
        OPEN.write(root / "payments")


def test_scorecard_requests_outside_a_scorecard_run_are_refused(federation, card) -> None:
    """The scorecard's messages belong to a scorecard run: asked in a DP tree run, they would
    release WoE-weighted partial logits of every person without noise; the training logits
    belong to the non-private scorecard only (the DP scorecard computes its steps from the
    pre-bins), and the pre-bins (`query.gbdt_route`) to the DP scorecard only: a non-private
    scorecard's authority sees merged bins' logits, not every person's pre-bin."""
    _, grid, xs, _ = federation
    tables, _ = _held_tables(grid, card, "cardmode")
    content = m.make_content(None, **pack_tables(tables))
    logits = m.make_content({"round": 1}, weights=-np.ones(xs["payments"].shape[1]))
    assert not ask(grid, 1, LOGITS, logits).has_error()  # in the announced scorecard run
    announce_run(grid, "cardmode", "gbdt", epsilon=1.0)
    refused(ask(grid, 1, WOE, content), "no request of a model.kind=gbdt run")
    refused(ask(grid, 1, LOGITS, logits), "no request of a model.kind=gbdt run")
    announce_run(grid, "cardmode", "scorecard", epsilon=1.0)
    refused(ask(grid, 1, LOGITS, logits), "non-private run only", "privacy.epsilon=1")
    route = m.make_content(None, features=np.zeros(1, np.int64), bins=np.zeros(1, np.int64),
                           positions=np.arange(10, dtype=np.int64))
    announce_run(grid, "cardmode", "scorecard")
    refused(ask(grid, 1, gbdt_msg.ROUTE, route), "DP run only", "without DP")


def test_a_scorecard_run_answers_root_histograms_only(federation, card, monkeypatch) -> None:
    """A scorecard run's label sums are over the root (every training row). Per-bin counts
    over a subset the authority picks are the trees' disclosure, not the scorecard's."""
    _, grid, xs, _ = federation
    _held_tables(grid, card, "cardroot")
    subset = level_request(0, [np.arange(0, 300, 2)], 300)
    with monkeypatch.context() as old:  # the mechanism: any node is answered
        old.setattr(gbdt_handlers, "_check_level", lambda *args: None)
        h = m.get_array(ask(grid, 1, LEVEL, subset), "h", np.float64, 3)[0]
        assert h.sum(axis=1).tolist() == [150.0] * xs["payments"].shape[1]
    refused(ask(grid, 1, LEVEL, subset), "root node over every training row")
    assert not ask(grid, 1, LEVEL, level_request(0, [np.arange(300)], 300)).has_error()


# ---- what a silo learns of the labels ------------------------------------------------------


class _Tap(ScorecardSilo):
    """A silo that keeps every gradient message it receives."""

    seen: list[Gradients]

    def gradients(self, msg: Gradients | EncryptedGradients) -> None:
        assert isinstance(msg, Gradients)
        self.seen.append(msg)
        super().gradients(msg)


@pytest.mark.parametrize("epsilon", [1.0, math.inf])
def test_a_silo_guesses_labels_no_better_than_rr_allows(epsilon: float) -> None:
    """Everything label-dependent a silo receives (the counts' g = RR label, each step's
    forward-corrected g) gives the RR label and nothing more: a curious silo's best guess of y
    is right e^eps / (1 + e^eps) of the time, at every step; every time without protection."""
    x, y = credit_like(6000, seed=5)
    rng = np.random.default_rng(8)
    y_view = randomized_response(y.astype(np.int8), epsilon, rng).astype(np.float64)
    seen: list[Gradients] = []
    silos = {}
    for name, part in by_silo(x).items():
        silos[name] = _Tap(name, part, bins=16)
        silos[name].seen = seen
    model = fit_scorecard(silos, y_view, ScorecardParams(bins=16), flip_probability(epsilon))
    assert len(seen) == len(silos) * (1 + model.steps)
    assert model.steps > 2
    bound = keep_probability(epsilon)
    slack = 4 * math.sqrt(bound * (1 - bound) / len(y)) + 1e-12
    for msg in seen:
        guess = msg.g if msg.tree == 0 else (msg.g < 0).astype(np.float64)
        assert np.array_equal(guess, y_view)  # the RR label, nothing more
        accuracy = float((guess == y).mean())
        assert abs(accuracy - bound) <= slack


# ---- the DP scorecard (server/scorecard_dp_run.py) over the same handlers -------------------


def test_the_phase_reproduces_the_in_process_fit_and_its_ledger_verifies(
        federation, tmp_path: Path) -> None:
    """Four round trips, none carrying a label or a gradient to a silo; the same tables,
    coefficients and margins as `fit_dp_scorecard` in process from the same secret; each
    silo's points table on disk; ledger lines the independent accountant agrees with."""
    fed, grid, xs, root = federation
    job = wired_job(federation, DP_FAST, "dpcard1", 5, kind="scorecard", logit=(3.0, -1.0))
    cfg, train, y = job.cfg, job.train, job.y
    result, platt, spent = scorecard_dp_run.train_and_calibrate(
        job, run_phases.PhaseTimer(None), Ledger(tmp_path), SecretRandom(SECRET), 4)
    kinds = [msg.metadata.message_type for msg in grid.sent]
    assert set(kinds) == {gbdt_msg.START, gbdt_msg.ROUTE, WOE, SCORE}
    assert kinds.count(gbdt_msg.ROUTE) == len(xs)
    assert result.round_trips == 4
    for msg in grid.sent:  # nothing label-dependent before the DP model
        sent = set(msg.content["arrays"].keys()) if "arrays" in msg.content else set()
        assert not {"g", "h"} & sent

    params = scorecard_dp_run.dp_params(cfg)
    budget = gbdt_dp_run.plan_budget(cfg, tuple(fed.silos), len(train), params)
    local = {s: GbdtSilo(s, x[train], bins=params.card.bins) for s, x in xs.items()}
    fit = scorecard_dp.fit_dp_scorecard(
        local, y[train], params, epsilon=budget.target, delta=budget.deltas.accountant,
        rng=SecretRandom(SECRET), purpose="dpcard1",
        prefix=gbdt_dp_run.statistics_history(budget.statistics))
    everyone = scorecard_dp.route_pre_bins(
        {s: GbdtSilo(s, x, bins=params.card.bins) for s, x in xs.items()}, params.card.bins)
    np.testing.assert_allclose(result.logits, scorecard_dp.margins(fit.model, everyone),
                               rtol=0, atol=1e-10)
    assert result.bias == fit.model.intercept
    assert result.steps == params.steps
    assert all((c <= 0).all() for c in fit.model.coef.values())
    assert set(result.explained) == set(xs)  # the silos' reason codes
    for s in xs:
        with (root / s / "scorecards" / "dpcard1" / TABLE_FILE).open() as f:
            table = list(csv.DictReader(f))
        assert len(table) == sum(len(t.woe) for t in fit.model.tables[s])

    assert_dp_model_ledger_verifies(tmp_path, cfg, spent, steps=6, round_trips=4)
    assert platt.a != 1.0 or platt.b != 0.0  # the DP calibration ran (its line is checked)
