"""Discrimination and calibration metrics, vectorised."""

from __future__ import annotations

import numpy as np

from clients.protocol.metrics import auc, binary_scores


def ks(y: np.ndarray, p: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic: max gap between the classes' score CDFs."""
    y, p = binary_scores(y, p)
    order = np.argsort(p, kind="stable")
    ys, ps = y[order], p[order]
    # Evaluate the CDFs only where the score changes, so ties do not split.
    last = np.r_[ps[1:] != ps[:-1], True]
    cdf_pos = np.cumsum(ys)[last] / ys.sum()
    cdf_neg = np.cumsum(1 - ys)[last] / (1 - ys).sum()
    return float(np.abs(cdf_pos - cdf_neg).max())


def gini(y: np.ndarray, p: np.ndarray) -> float:
    return 2.0 * auc(y, p) - 1.0


def brier(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return float(np.mean((p - y) ** 2))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


# The figures `summary` measures, as metrics.json names them on the scored test people; on
# every test person they carry the prefix ALL_TEST (simulations/run/outcome.py).
FIGURES = ("auc", "ks", "gini", "brier", "log_loss")
ALL_TEST = "all_test_"


def summary(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    a = auc(y, p)
    return {"auc": a, "ks": ks(y, p), "gini": 2 * a - 1, "brier": brier(y, p),
            "log_loss": log_loss(y, p)}
