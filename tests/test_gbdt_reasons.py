"""The trees' reason codes and per-silo points (server/gbdt_reasons.py): over the silos' real
handlers (no engine), the SecureBoost and the DP trees' points add up to the published score,
the DP trees' reasons read only the released noisy leaf sums, and the silo's policy `explain`
decides: consent within it, a refusal (or a decline, when the run did not configure reasons)
beyond it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.credits import dense_add
from clients.protocol import gbdt as msg
from clients.protocol import messages as m
from clients.protocol.schema import SILO_FEATURES
from clients.silo.gbdt import GbdtSilo
from crypto.secret_random import SecretRandom
from server import explanations, gbdt, gbdt_dp, gbdt_dp_run, gbdt_run, run_phases, scoring
from server.config import AuthorityConfig
from server.config_keys import parse_flat
from server.federation import FederationError
from server.gbdt_reasons import Credits, FeatureNames, dp_credits, explained, released_values
from server.gbdt_run import TreeJob
from server.ledger import Ledger
from server.run_plan import reasons_asked
from tests.test_gbdt_dp_wire import SECRET, SMALL, wired_job
from tests.test_gbdt_wire import (  # noqa: F401 (fixtures)
    _task_identity,
    announce_run,
    ask,
    federation,
    policy,
    refused,
)

PLAIN = {"model.kind": "gbdt", "privacy.epsilon": "inf", "privacy.label_epsilon": "inf",
         "gbdt.trees": "4", "gbdt.depth": "3", "gbdt.bins": "16", "gbdt.min_child_weight": "1"}


def _job(federation, flat: dict, run: str, seed: int) -> TreeJob:  # noqa: F811
    # About 15 % defaulters: margins inside the DP calibration's domain (logits -6..0).
    return wired_job(federation, flat, run, seed, logit=(2.0, -2.0))


def assert_points_add_up(result, platt: scoring.Platt, cfg: AuthorityConfig, k: int
                         ) -> pd.DataFrame:
    """points_base + each silo's points = the unrounded score, and with points_limit the
    published one, for every person inside the calibration's domain; k reasons at most,
    each costing points (negative), ranked."""
    frame = explanations.points_frame(result.explained, result.bias, platt, cfg.score, k)
    offset, factor = scoring.scale(cfg.score)
    z = result.logits
    inside = (z >= platt.low) & (z <= platt.high)
    assert inside.mean() > 0.9
    raw = offset - factor * (platt.a * z + platt.b)
    silos = [c for c in frame if c.startswith("points_") and c not in ("points_base",
                                                                       "points_limit")]
    assert len(silos) == 3
    total = frame["points_base"] + frame[silos].sum(axis=1)
    np.testing.assert_allclose(total[inside], raw[inside], atol=1e-6)
    published = scoring.to_score(platt(z), cfg.score)
    np.testing.assert_array_equal((np.rint(total) + frame["points_limit"])[inside],
                                  published[inside])
    costs = frame[[f"reason_{j + 1}_points" for j in range(k)]].to_numpy()
    assert np.nanmax(costs) < 0
    listed = costs[:, 0][~np.isnan(costs[:, 0])]
    assert len(listed) > 0.5 * len(frame)
    assert (np.diff(np.nan_to_num(costs, nan=0.0), axis=1) >= -1e-12).all()  # worst first
    assert {c.split(".")[0] for c in frame["reason_1"].dropna().astype(str)} <= {
        s.removeprefix("points_") for s in silos}
    return frame


def test_secureboost_reasons_add_up_to_the_score(federation) -> None:  # noqa: F811
    job = _job(federation, {**PLAIN, "explain.reasons": "2"}, "rsn1", 5)
    grid = federation[1]
    grid.sent.clear()
    result, platt = gbdt_run.train_and_calibrate(job, run_phases.PhaseTimer(None), reasons=2)
    asked = [s for s in grid.sent if s.metadata.message_type == msg.EXPLAIN]
    assert len(asked) == 3
    assert grid.sent.index(asked[0]) == 3  # right after the start, before any tree
    assert set(result.explained) == set(job.fed.silos)
    assert max(e.index.shape[1] for e in result.explained.values()) == 2
    frame = assert_points_add_up(result, platt, job.cfg, 2)
    # The silos' names, not column indices: features of the generated schema.
    named = {f"{s}.{f.name}" for s, fs in SILO_FEATURES.items() for f in fs}
    codes = set(frame["reason_1"].dropna().astype(str))
    assert len(codes) > 3
    assert codes <= named
    # The per-silo summary reads the same contributions the points come from.
    for silo, why in result.explained.items():
        assert result.contributions[silo]["mean"] == pytest.approx(why.delta.mean())


def test_dp_reasons_add_up_and_read_only_the_released_sums(
        federation, tmp_path: Path, monkeypatch) -> None:  # noqa: F811 (the fixture)
    job = _job(federation, SMALL, "rsn2", 6)
    result, platt, _ = gbdt_dp_run.train_and_calibrate(
        job, run_phases.PhaseTimer(None), Ledger(tmp_path), SecretRandom(SECRET), reasons=3)
    assert_points_add_up(result, platt, job.cfg, 3)

    # In process from the same secret: the released trees and everyone's leaves.
    params = gbdt_dp_run.dp_params(job.cfg)
    fed, _, xs = federation
    budget = gbdt_dp_run.plan_budget(job.cfg, tuple(fed.silos), len(job.train), params)
    routed = {s: GbdtSilo(s, x * msg.STANDARD_UNITS / msg.DP_UNITS, bins=params.bins)
              for s, x in xs.items()}
    structure = gbdt_dp.draw_structure(routed, params, SecretRandom(SECRET).generator(
        gbdt_dp.PURPOSE, "rsn2", "structure"))
    leaf = gbdt_dp.route_all(routed, structure, job.n_positions, params.depth)
    trees = gbdt_dp.boost(leaf[:, job.train], job.y[job.train].astype(float), structure,
                          params, budget.release, SecretRandom(SECRET), purpose="rsn2")
    widths = {s: x.shape[1] for s, x in xs.items()}
    # Each leaf's value is the Newton step of its released sums: the path credits telescope.
    offset = 2**params.depth - 1
    for tree, sums in zip(trees.model.trees, trees.sums, strict=True):
        values = gbdt_dp.newton_leaf_values(sums[0], sums[1], params)
        np.testing.assert_allclose(values, [tree.leaves[offset + i]
                                            for i in range(offset + 1)], atol=1e-12)

    # Nothing but the release is read: with every way to the exact g, h broken, the same
    # credits; and moving one released leaf sum moves them.
    def no_gradients(*_: object) -> None:
        raise AssertionError("the reasons read the exact gradients")

    monkeypatch.setattr(gbdt_dp, "gradients", no_gradients)
    monkeypatch.setattr(gbdt, "gradients", no_gradients)
    credits, bias = dp_credits(trees, params, leaf, widths)
    assert bias == pytest.approx(result.bias)
    for silo, why in result.explained.items():
        np.testing.assert_allclose(credits.contributions()[silo], why.delta, atol=1e-12)
    moved = [s.copy() for s in trees.sums]
    moved[0][1, int(leaf[0, 0])] += 50.0  # H~ of the first person's leaf, first tree
    shifted, _ = dp_credits(gbdt_dp.DpTrees(model=trees.model, release=trees.release,
                                            sums=tuple(moved)), params, leaf, widths)
    assert not np.allclose(shifted.per_silo()[structure[0][0].silo],
                           credits.per_silo()[structure[0][0].silo])


def test_credits_telescope_on_a_small_tree() -> None:
    """Root 0 on (a, col 1), node 2 on (b, col 0): a person in leaf 6 gets a's credit for
    0 -> 2 and b's for 2 -> 6; the reasons rank a silo's features by credit, k at most."""
    tree = gbdt.Tree(splits={0: gbdt.Split(silo="a", feature=1, bin=3),
                             2: gbdt.Split(silo="b", feature=0, bin=1)},
                     leaves={1: -0.5, 5: 0.1, 6: 0.7})
    values = np.array([0.2, -0.5, 0.4, 0.0, 0.0, 0.1, 0.7])
    credits = Credits({"a": 2, "b": 1}, 3)
    credits.add(tree, values, np.array([6, 1, 5]))
    per = credits.per_silo()
    np.testing.assert_allclose(per["a"], [[0, 0.2], [0, -0.7], [0, 0.2]])
    np.testing.assert_allclose(per["b"], [[0.3], [0.0], [-0.3]])
    total = 0.2 + sum(credits.contributions().values())
    np.testing.assert_allclose(total, values[[6, 1, 5]])
    names = {"a": FeatureNames(["x", "y"], np.array([0, 1])), "b": FeatureNames(["z"],
                                                                                np.array([0]))}
    why = explained(credits, names, 1)
    np.testing.assert_array_equal(why["a"].index[:, 0], [1, -1, 1])  # only what costs
    np.testing.assert_array_equal(why["b"].index[:, 0], [0, -1, -1])


@st.composite
def _trees_and_people(draw):
    """A SecureBoost-like tree (leaves at any depth up to 4, every split on a random silo's
    column, columns repeating along paths), node values, and each person's leaf."""
    widths = {s: draw(st.integers(1, 4)) for s in ("a", "b", "c")[:draw(st.integers(1, 3))]}
    splits, leaves, open_ = {}, {}, [0]
    while open_:
        n = open_.pop()
        if n < 15 and draw(st.booleans()):
            silo = draw(st.sampled_from(sorted(widths)))
            splits[n] = gbdt.Split(silo=silo, feature=draw(st.integers(0, widths[silo] - 1)),
                                   bin=0)
            open_ += [2 * n + 1, 2 * n + 2]
        else:
            leaves[n] = 0.0
    tree = gbdt.Tree(splits=splits, leaves=leaves)
    size = max([*leaves, *splits]) + 1
    values = np.array(draw(st.lists(st.floats(-3, 3), min_size=size, max_size=size)))
    rows = draw(st.integers(1, 40))
    heap = np.array(draw(st.lists(st.sampled_from(sorted(leaves)), min_size=rows,
                                  max_size=rows)), dtype=np.int64)
    return widths, [(tree, values, heap) for _ in range(draw(st.integers(1, 3)))]


@settings(max_examples=30)
@given(_trees_and_people())
def test_credits_over_touched_slots_equal_the_dense_bincount(case) -> None:
    """Credits.add adds only the slots a tree touches (stop 34's review: the bincount over
    every slot allocated rows x columns per tree); the credits are the old ones bit for bit
    (bench/credits.py `dense_add`), repeated columns on a path included."""
    widths, trees = case
    rows = len(trees[0][2])
    new, old = Credits(widths, rows), Credits(widths, rows)
    for tree, values, heap in trees:
        new.add(tree, values, heap)
        dense_add(old, tree, values, heap)
    np.testing.assert_array_equal(new._flat, old._flat)


def test_the_silos_policy_decides(federation, policy) -> None:  # noqa: F811
    """Policy explain=2: a run that configured 3 reasons is refused before training, a tree
    run's default ask (explain.reasons=0: MAX_REASONS) is declined and it goes on without
    reasons; explain=0: none at all; 2 asked within 2: consent with the silo's names."""
    _, grid, _ = federation
    assert reasons_asked(parse_flat(AuthorityConfig, PLAIN)) == 4
    policy(min_group=1, explain=2, require_secure_sum=False)
    job = _job(federation, {**PLAIN, "explain.reasons": "3"}, "rsn3", 7)
    grid.sent.clear()
    with pytest.raises(FederationError, match="refused by silo policy 'explain'"):
        gbdt_run.train_and_calibrate(job, run_phases.PhaseTimer(None), reasons=3)
    assert not any(s.metadata.message_type == msg.LEVEL for s in grid.sent)
    job = _job(federation, PLAIN, "rsn4", 7)
    result, _ = gbdt_run.train_and_calibrate(job, run_phases.PhaseTimer(None), reasons=4)
    assert result.explained == {}
    assert result.contributions  # the per-silo points stay
    policy(min_group=1, explain=0, require_secure_sum=False)
    announce_run(grid, "rsn5")
    one = m.make_content({"reasons": 1, "required": 1})
    refused(ask(grid, 1, msg.EXPLAIN, one), "refused by silo policy 'explain'")
    reply = ask(grid, 1, msg.EXPLAIN, m.make_content({"reasons": 1, "required": 0}))
    assert m.get_config(reply)["consent"] == 0
    assert "arrays" not in reply.content
    policy(min_group=1, explain=2, require_secure_sum=False)
    reply = ask(grid, 1, msg.EXPLAIN, m.make_content({"reasons": 2, "required": 1}))
    features = list(m.get_config(reply)["explain.features"])
    columns = m.get_array(reply, "columns", np.int64, 1)
    assert m.get_config(reply)["consent"] == 2
    assert "on_time_repayment_rate" in features
    assert columns.max() == len(features) - 1
    # A scorecard run is no tree run: the consent request is refused by its mode.
    announce_run(grid, "rsn6", kind="scorecard")
    refused(ask(grid, 1, msg.EXPLAIN, m.make_content({"reasons": 1})), msg.EXPLAIN)


def test_an_inner_dp_node_is_the_newton_step_of_its_leaves_sums_with_each_leafs_lambda() -> None:
    """Root of a depth-1 tree: -lr (G1 + G2) / (H1 + H2 + 2 lambda), the mean of the leaves'
    values weighted by H~ + lambda, so it stays within the leaves' values however noisy the
    sums (a negative H~ counts as 0, as in a leaf's step)."""
    params = gbdt_dp.DpTreeParams(trees=1, depth=1, bins=4, lr=1.0, lambda_=1.0,
                                  sample_rate=1.0, max_leaf=10.0)
    sums = np.array([[-2.0, 4.0], [1.0, 3.0]])
    values = released_values(gbdt_dp.newton_leaf_values(sums[0], sums[1], params), sums, params)
    np.testing.assert_allclose(values, [-2.0 / 6.0, 1.0, -1.0])
    sums = np.array([[-900.0, 50.0], [-40.0, 2.0]])
    noisy = released_values(gbdt_dp.newton_leaf_values(sums[0], sums[1], params), sums, params)
    assert noisy[2] < noisy[0] < noisy[1] == 10.0  # clipped leaf, root between the leaves
