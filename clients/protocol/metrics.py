"""The ranking metric both sides report: the authority on its validation and test people
(server/metrics.py builds its other metrics beside it), a region on its own validation people.
One implementation, so a region's validation AUC and the authority's mean the same thing."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata


def binary_scores(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores as float arrays, checked: 1-d, equal length, labels 0 or 1, both
    classes present (AUC and KS mean nothing otherwise)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {p.shape} must be 1-d of equal length")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError("AUC and KS need both classes among the labels")
    return y, p


def auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    y, p = binary_scores(y, p)
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
