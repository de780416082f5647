"""Reason codes: the silo's attribution message and the authority's points (known answers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from clients.silo.data import SiloMatrix
from clients.silo.explain import explain, features_of
from server.config import ScoreConfig
from server.explanations import Explained, ExplanationError, points_frame
from server.scoring import Platt, scale, to_score


@dataclass
class _Spec:
    outputs: int = 1
    transcript_sigma: float = 0.0


class LinearSilo:
    """A silo model g(x) = w . x, standing in for the trained bottom model at this unit's edge."""

    def __init__(self, w: np.ndarray) -> None:
        self.w = np.asarray(w, dtype=np.float32)
        self.spec = _Spec()

    def contributions(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.w).astype(np.float32)


def _matrix(x: np.ndarray, columns: list[str]) -> SiloMatrix:
    return SiloMatrix(x=x.astype(np.float32), columns=columns,
                      ids=pd.Series([f"id{i}" for i in range(len(x))]))


def test_features_of_groups_indicators_and_one_hot_columns():
    m = _matrix(np.zeros((1, 5)), ["a", "b", "c=1", "c=2", "a__missing"])
    assert features_of(m) == ["a", "b", "c"]


def test_silo_explanation_known_answer():
    # Typical person = column medians = (0, 0, 0); g = 2a - b + 0.5c.
    x = np.array([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, -2.0],
                  [-2.0, 0.0, 0.0]])
    silo = LinearSilo([2.0, -1.0, 0.5])
    why = explain(silo, _matrix(x, ["a", "b", "c"]), x.astype(np.float32), k=2)
    assert why.reference == pytest.approx(0.0)
    np.testing.assert_allclose(why.delta, [1.0, -1.0, 0.0, 3.0, -4.0], atol=1e-6)
    # Person 0: a raises the logit by 2, b lowers it by 1: only a is a reason.
    assert why.index[0].tolist() == [0, -1]
    np.testing.assert_allclose(why.share[0], [2.0, 0.0], atol=1e-6)
    # Person 1: b (+1) is the only feature raising the logit.
    assert why.index[1].tolist() == [1, -1]
    assert why.index[2].tolist() == [-1, -1]
    # Person 3: a +4, c -1: one reason.
    assert why.index[3].tolist() == [0, -1]
    assert why.index[4].tolist() == [-1, -1]
    assert why.share.dtype == np.float32
    assert why.index.dtype == np.int16


def test_silo_explanation_shares_add_up_for_a_nonlinear_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    w1 = rng.normal(size=(4, 8)).astype(np.float32)
    w2 = rng.normal(size=8).astype(np.float32)

    class Mlp(LinearSilo):
        def contributions(self, rows: np.ndarray) -> np.ndarray:
            return (np.tanh(rows @ w1) @ w2).astype(np.float32)

    why = explain(Mlp(np.zeros(4)), _matrix(x, ["a", "b", "c", "d"]), x, k=4)
    # All four shares listed when k = features: the positive ones must be the listed ones.
    listed = np.where(why.index >= 0, why.share, 0).sum(axis=1)
    assert (listed >= -1e-6).all()
    assert (listed + 1e-5 >= why.delta).all()  # positive shares bound the total from above


def _explained(delta, index, share, reference, features):
    return Explained(np.asarray(delta, float), np.asarray(index), np.asarray(share, float),
                     reference, features)


def test_points_add_up_to_the_score_and_reasons_merge_across_silos():
    cfg = ScoreConfig()
    offset, factor = scale(cfg)
    cal = Platt(a=1.5, b=-0.2)
    bias = -3.0
    pay = _explained([0.4, -0.2], [[0, 1], [-1, -1]], [[0.3, 0.1], [0, 0]], 0.1, ["p0", "p1"])
    soc = _explained([0.25, 0.1], [[0, -1], [0, -1]], [[0.25, 0], [0.1, 0]], -0.05, ["s0"])
    frame = points_frame({"payments": pay, "social": soc}, bias, cal, cfg, k=2)
    base = offset - factor * (cal.a * (bias + 0.1 - 0.05) + cal.b)
    assert frame["points_base"].iloc[0] == pytest.approx(base)
    z = bias + np.array([0.1 + 0.4 - 0.05 + 0.25, 0.1 - 0.2 - 0.05 + 0.1])
    score = to_score(cal(z), cfg)
    total = frame[["points_base", "points_payments", "points_social", "points_limit"]].sum(axis=1)
    np.testing.assert_allclose(total, score, atol=0.5 + 1e-9)
    # Person 0: costs p0 0.3, s0 0.25, p1 0.1 (logit) -> the two largest, in order.
    assert list(frame.loc[0, ["reason_1", "reason_2"]]) == ["payments.p0", "social.s0"]
    assert frame.loc[0, "reason_1_points"] == pytest.approx(-factor * cal.a * 0.3)
    # Person 1: one reason only; the second slot is empty.
    assert frame.loc[1, "reason_1"] == "social.s0"
    assert pd.isna(frame.loc[1, "reason_2"])
    assert np.isnan(frame.loc[1, "reason_2_points"])


def test_points_limit_carries_what_the_scale_cuts_off():
    cfg = ScoreConfig()
    huge = _explained([-40.0], [[-1]], [[0.0]], 0.0, ["f"])  # a very safe person: above 850
    frame = points_frame({"s": huge}, 0.0, Platt(1.0, 0.0), cfg, k=1)
    total = frame[["points_base", "points_s", "points_limit"]].sum(axis=1).iloc[0]
    assert frame["points_limit"].iloc[0] < 0
    assert total == pytest.approx(850, abs=0.5)


def test_no_reasons_when_the_calibration_slope_is_not_positive():
    e = _explained([0.1], [[0]], [[0.1]], 0.0, ["f"])
    with pytest.raises(ExplanationError, match="slope"):
        points_frame({"s": e}, 0.0, Platt(-1.0, 0.0), ScoreConfig(), k=1)
