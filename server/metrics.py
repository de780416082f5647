"""Discrimination and calibration metrics, vectorised."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {p.shape} must be 1-d of equal length")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError("AUC and KS need both classes among the labels")
    return y, p


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    y, p = _check(y, p)
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ks(y: np.ndarray, p: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic: max gap between the classes' score CDFs."""
    y, p = _check(y, p)
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


def summary(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    a = auc(y, p)
    return {"auc": a, "ks": ks(y, p), "gini": 2 * a - 1, "brier": brier(y, p),
            "log_loss": log_loss(y, p)}
