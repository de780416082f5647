"""Vertical WoE scorecard (issue 20 item 2): WoE from the protected histograms equals the
central WoE, the regression reaches the central sign-constrained fit, the points add up to the
score, and what crosses the message boundary."""

from __future__ import annotations

import csv
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from clients.protocol import gbdt as gmsg
from clients.protocol import scorecard as smsg
from clients.silo.data import Preparation
from clients.silo.gbdt import bin_index
from clients.silo.scorecard import TABLE_COLUMNS, ScorecardSilo, raw_units
from server.config import ScoreConfig
from server.scorecard import ScorecardParams, fit_scorecard, points, pre_bin_woe
from server.scoring import scale, to_score
from simulations.analysis import references as ref
from simulations.run.scorecard import (
    fit_vertical_scorecard,
    predict_vertical_scorecard,
    reasons,
    scored_silos,
    scores,
    write_tables,
)
from tests.messages import arrays_in

SPLIT = {"bank": slice(0, 3), "telco": slice(3, 5), "utility": slice(5, 7)}


def additive(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seven features on the prepared scale: risk rising in 0 and 3 (correlated with 0),
    falling in 1, an S-curve in 2, noise in 4 and 5, a 0/1 flag in 6; an additive logit."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.4, (n, 7))
    x[:, 3] += 0.5 * x[:, 0]
    x = np.clip(x, -1, 1)
    x[:, 6] = rng.random(n) < 0.3
    logit = (-2 + 1.5 * x[:, 0] - 1.2 * x[:, 1] + 0.8 * np.tanh(3 * x[:, 2]) + 0.6 * x[:, 3]
             + 0.7 * x[:, 6])
    return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)


def by_silo(x: np.ndarray, split: dict[str, slice] = SPLIT) -> dict[str, np.ndarray]:
    return {name: x[:, cols] for name, cols in split.items()}


@pytest.fixture(scope="module")
def fitted() -> tuple[np.ndarray, np.ndarray, Any]:
    x, y = additive(12_000, seed=0)
    return x, y, fit_vertical_scorecard(by_silo(x[:8000]), y[:8000], bins=32)


def joined_woe(model: Any, x: np.ndarray) -> np.ndarray:
    """The WoE columns a central analyst would build from the same bins."""
    b = bin_index(x, model.params.bins)
    w = np.vstack([pre_bin_woe(model.tables[s], model.params.bins) for s in SPLIT])
    return np.column_stack([w[f][b[:, f]] for f in range(x.shape[1])])


def test_woe_from_the_histograms_is_the_central_woe_of_the_same_bins(fitted: Any) -> None:
    """The reference's monotone_bins on each column's pre-bin index (its candidate cuts are
    then the pre-bins present) gives the same cuts and bit-identical WoE."""
    x, y, model = fitted
    b = bin_index(x[:8000], 32).astype(np.float64)
    params = ref.ScorecardParams(max_bins=32, min_bin_share=0.05, smoothing=0.5)
    tables = [t for s in SPLIT for t in model.tables[s]]
    assert any(len(t.woe) >= 5 for t in tables)
    for f, table in enumerate(tables):
        central = ref.monotone_bins(b[:, f], y[:8000], params)
        assert table.cuts.tolist() == central.cuts.tolist()
        assert np.array_equal(table.woe, central.woe)


def test_woe_is_monotone_and_coefficients_obey_the_sign(fitted: Any) -> None:
    _, _, model = fitted
    for s in SPLIT:
        for table in model.tables[s]:
            step = np.diff(table.woe)
            assert (step >= -1e-12).all() or (step <= 1e-12).all()
        assert (model.coef[s] <= 0).all()
    # Risk rises with feature 0: its WoE (goods over bads) falls, and it carries weight.
    assert (np.diff(model.tables["bank"][0].woe) < 0).all()
    assert (np.diff(model.tables["bank"][1].woe) > 0).all()
    assert len(model.tables["utility"][1].woe) == 2  # the flag's two values
    assert model.coef["bank"][0] < -0.5


def test_regression_reaches_the_central_fit_and_auc(fitted: Any) -> None:
    """Same WoE columns: the central projected Newton's coefficients. Against the central
    scorecard (quantile pre-bins on the raw values, not equal-width ones) the AUC is within a
    hundredth."""
    x, y, model = fitted
    coef, intercept = ref.fit_sign_constrained_logistic(joined_woe(model, x[:8000]), y[:8000])
    ours = np.concatenate([model.coef[s] for s in SPLIT])
    np.testing.assert_allclose(ours, coef, atol=1e-4)
    assert model.intercept == pytest.approx(intercept, abs=1e-4)
    test = slice(8000, None)
    vertical = roc_auc_score(y[test], predict_vertical_scorecard(model, by_silo(x[test])))
    central = ref.fit_scorecard(x[:8000], y[:8000])
    assert abs(vertical - roc_auc_score(y[test], central.logits(x[test]))) <= 0.01
    assert vertical > 0.7


def test_points_add_up_to_the_score_and_reasons_cost_the_most(fitted: Any,
                                                               tmp_path: Path) -> None:
    x, _, model = fitted
    cfg = ScoreConfig()
    rows = slice(8000, 9000)
    base, silos = scored_silos(model, by_silo(x[rows]), cfg)
    p = predict_vertical_scorecard(model, by_silo(x[rows]))
    offset, factor = scale(cfg)
    total = base + sum(s.row_points().sum(axis=1) for s in silos.values())
    np.testing.assert_allclose(total, offset + factor * (np.log1p(-p) - np.log(p)), atol=1e-8)
    assert np.array_equal(scores(base, silos), to_score(p, cfg))
    names, silo, feature, lost = reasons(silos, k=3)
    _, per_bin = points(model, cfg)
    every = np.hstack([s.row_points() - [t.max() for t in per_bin[name]]
                       for name, s in silos.items()])
    widths = np.cumsum([0] + [s.features for s in silos.values()])
    person = int(np.argmin(every.min(axis=1)))  # someone with a real loss
    top = int(np.argmin(every[person]))
    assert lost[person, 0] == pytest.approx(every[person, top])
    assert widths[silo[person, 0]] + feature[person, 0] == top
    assert names == list(SPLIT)
    assert (np.diff(np.nan_to_num(lost, nan=0.0), axis=1) >= 0).all()  # worst first
    paths = write_tables(silos, tmp_path)
    with paths[0].open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == TABLE_COLUMNS
    assert len(table) == sum(len(t.woe) for t in model.tables["bank"])
    first = [r for r in table if r["feature"] == "0"]
    assert float(first[0]["low"]) == -np.inf
    assert float(first[-1]["high"]) == np.inf
    assert all(a["high"] == b["low"] for a, b in itertools.pairwise(first))  # contiguous


class Recorder:
    """A scorecard silo that logs every message in and out."""

    def __init__(self, silo: ScorecardSilo, log: list[tuple[str, Any]]) -> None:
        self.silo, self.log = silo, log

    @property
    def features(self) -> int:
        return self.silo.features

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.silo, name)

        def call(m: Any) -> Any:
            self.log.append(("to", m))
            reply = method(m)
            if reply is not None:
                self.log.append(("from", reply))
            return reply
        return call


def recorded_fit(x: np.ndarray, y: np.ndarray, split: dict[str, slice],
                 params: ScorecardParams) -> tuple[Any, list[tuple[str, Any]]]:
    log: list[tuple[str, Any]] = []
    silos = {name: Recorder(ScorecardSilo(name, m, bins=params.bins), log)
             for name, m in by_silo(x, split).items()}
    return fit_scorecard(silos, y, params), log


def test_only_sums_and_partial_logits_leave_a_silo() -> None:
    x, y = additive(600, seed=1)
    model, log = recorded_fit(x, y, SPLIT, ScorecardParams(bins=16, iterations=5))
    received = [m for d, m in log if d == "from"]
    assert {type(m) for m in received} == {gmsg.HistogramReply, smsg.PartialLogits}
    for m in received:
        for name, a in arrays_in(m):
            if isinstance(m, smsg.PartialLogits):
                assert name == "logits"
                assert a.shape == y.shape  # the one per-row reply
            else:
                assert a.shape[1] == 16  # per (feature, bin)
    sent = [m for d, m in log if d == "to"]
    for m in sent:
        if isinstance(m, gmsg.HistogramRequest):
            assert [n.node for n in m.nodes] == [0]  # the root only
    per_row = {name for m in sent for name, a in arrays_in(m) if a.size == len(y)}
    assert per_row <= {"g", "h", "nodes.rows"}
    assert any(isinstance(m, smsg.WoeTables) for m in sent)
    assert sum((model.coef[s] != 0).sum() for s in SPLIT) >= 3


def test_encrypted_counts_and_gradients_give_the_plain_model() -> None:
    """Under BFV: counts are exact (0/1 values), so the tables are the plain ones; the
    gradient sums carry fixed-point rounding (at most 2^-21 a row), so a step's coefficient
    is off by at most max|WoE| 2^-21 / (Hessian diagonal per row), about 3e-6 here (measured:
    1.4e-6). No label nor gradient reaches a silo in the clear."""
    x, y = additive(200, seed=2)
    split = {"bank": slice(0, 1), "telco": slice(1, 2)}
    params = ScorecardParams(bins=4, iterations=1, min_bin_share=0.1)
    plain, _ = recorded_fit(x, y, split, params)
    encrypted, log = recorded_fit(x, y, split, dataclasses.replace(params, protection="he"))
    for s in split:
        for a, b in zip(encrypted.tables[s], plain.tables[s], strict=True):
            assert np.array_equal(a.cuts, b.cuts)
            assert np.array_equal(a.woe, b.woe)
    for s in split:
        assert (plain.coef[s] < 0).all()  # one step moved them
        np.testing.assert_allclose(encrypted.coef[s], plain.coef[s], atol=5e-6)
    assert encrypted.intercept == pytest.approx(plain.intercept, abs=5e-6)
    assert not any(isinstance(m, gmsg.Gradients) for _, m in log)
    replies = [m for _, m in log if isinstance(m, gmsg.HistogramReply)]
    assert replies
    assert all(isinstance(n, gmsg.EncryptedNodeHistogram) for m in replies for n in m.nodes)
    for _, m in log:
        if dataclasses.is_dataclass(m):
            assert not any(np.array_equal(a, y) for _, a in arrays_in(m))


def test_bad_tables_and_missing_silos_are_refused() -> None:
    x, y = additive(300, seed=3)
    silo = ScorecardSilo("bank", x[:, :2], bins=8)
    good = smsg.FeatureWoe(cuts=np.array([3]), woe=np.array([0.5, -0.5]))
    with pytest.raises(ValueError, match="one WoE table per feature"):
        silo.woe_tables(smsg.WoeTables(features=(good,)))
    wrong = smsg.FeatureWoe(cuts=np.array([5, 3]), woe=np.zeros(3))
    with pytest.raises(ValueError, match="ascending"):
        silo.woe_tables(smsg.WoeTables(features=(good, wrong)))
    with pytest.raises(ValueError, match="no WoE tables"):
        silo.partial_logits(smsg.PartialLogitsRequest(round=0, weights=np.zeros(2)))
    model = fit_vertical_scorecard(by_silo(x), y, bins=8, iterations=3)
    with pytest.raises(ValueError, match="not here"):
        predict_vertical_scorecard(model, {"bank": x[:, :3]})
    with pytest.raises(ValueError, match="0/1"):
        fit_vertical_scorecard(by_silo(x), 2 * y - 1)


def test_table_ranges_in_the_silos_own_units() -> None:
    """Through the inverse of the silo's preparation, each person's raw value lies in the raw
    range of the bin its prepared value falls in."""
    rng = np.random.default_rng(4)
    n = 3000
    df = pd.DataFrame({"income": rng.lognormal(8, 1, n), "age": rng.integers(18, 80, n) * 1.0})
    prep = Preparation.fit(df, "bank", ["income", "age"], rng=None)
    x = prep.transform(df)
    t = -1 - 0.8 * (np.log(df["income"]) - 8) + 0.03 * (df["age"] - 50)
    y = (rng.random(n) < 1 / (1 + np.exp(-t.to_numpy()))).astype(np.float64)
    model = fit_vertical_scorecard({"bank": x}, y, bins=32)
    _, silos = scored_silos(model, {"bank": x}, ScoreConfig(), {"bank": list(prep.columns)},
                            {"bank": raw_units(prep)})
    table = silos["bank"].table()
    for f, column in enumerate(("income", "age")):
        rows = [r for r in table if r["feature"] == f]
        assert len(rows) >= 3
        assert {r["column"] for r in rows} == {column}
        high = np.array([float(r["high"]) for r in rows])
        at = np.searchsorted(high, x[:, f].astype(np.float64), side="right")
        raw_low = np.array([float(r["raw_low"]) for r in rows])
        raw_high = np.array([float(r["raw_high"]) for r in rows])
        value = df[column].to_numpy()
        assert (value >= raw_low[at] * (1 - 1e-5) - 1e-6).all()
        assert (value <= raw_high[at] * (1 + 1e-5) + 1e-6).all()
    indicator = [r for r in table if r["column"] == "income__missing"]
    assert all(np.isnan(float(r["raw_low"])) for r in indicator)


def test_a_constant_feature_gets_one_bin_and_no_weight() -> None:
    x, y = additive(2000, seed=5)
    matrices = {"bank": x[:, :2], "const": np.full((2000, 1), 0.3)}
    model = fit_vertical_scorecard(matrices, y, bins=16)
    assert model.tables["const"][0].woe.tolist() == [0.0]
    assert model.coef["const"].tolist() == [0.0]
    assert (model.coef["bank"] < 0).all()
