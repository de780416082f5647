"""Metrics agree with scikit-learn and with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from server import metrics


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 5000)
    p = np.round(rng.random(5000) + 0.3 * y, 2)  # rounding makes ties
    assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_ks_matches_the_roc_curve():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 3000)
    p = rng.random(3000) + 0.5 * y
    fpr, tpr, _ = roc_curve(y, p)
    assert metrics.ks(y, p) == pytest.approx(np.max(tpr - fpr), abs=1e-12)


def test_known_answers():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert metrics.auc(y, p) == pytest.approx(0.75)
    assert metrics.gini(y, p) == pytest.approx(0.5)
    assert metrics.ks(y, p) == pytest.approx(0.5)
    assert metrics.brier(y, p) == pytest.approx(brier_score_loss(y, p))


def test_one_class_is_an_error():
    with pytest.raises(ValueError, match="both classes"):
        metrics.auc(np.zeros(5), np.random.default_rng(0).random(5))
