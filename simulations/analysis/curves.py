"""Aggregate curves for the report (curves.json): what the figures need, nothing per person.

Everything here is a count or a rate over many people, computed on the test split (except the
score histogram, over everyone scored), so the report can be shared without the scores file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from server.scoring import SCORE_MAX, SCORE_MIN, TIER_KEYS
from simulations.analysis.audit import clopper_pearson

ROC_POINTS = 201
HISTOGRAM_BIN = 10


def roc(y: np.ndarray, p: np.ndarray, points: int = ROC_POINTS) -> dict:
    """ROC curve at up to `points` thresholds (evenly spaced in rank), from (0,0) to (1,1)."""
    order = np.argsort(-p, kind="stable")
    ys = y[order]
    tp = np.concatenate([[0], np.cumsum(ys)])
    fp = np.concatenate([[0], np.cumsum(1 - ys)])
    keep = np.unique(np.linspace(0, len(ys), min(points, len(ys) + 1)).round().astype(int))
    return {"fpr": (fp[keep] / max(fp[-1], 1)).tolist(),
            "tpr": (tp[keep] / max(tp[-1], 1)).tolist()}


def ks_curve(y: np.ndarray, score: np.ndarray) -> dict:
    """Cumulative share of defaulters (bad) and of the others (good) at or below each score."""
    thresholds = np.arange(SCORE_MIN, SCORE_MAX + 1, 5)
    sorted_bad = np.sort(score[y == 1])
    sorted_good = np.sort(score[y == 0])
    cdf_bad = np.searchsorted(sorted_bad, thresholds, side="right") / max(len(sorted_bad), 1)
    cdf_good = np.searchsorted(sorted_good, thresholds, side="right") / max(len(sorted_good), 1)
    return {"score": thresholds.tolist(), "cdf_bad": cdf_bad.tolist(),
            "cdf_good": cdf_good.tolist()}


def score_histogram(score: np.ndarray, tier: pd.Series) -> dict:
    edges = np.arange(SCORE_MIN, SCORE_MAX + HISTOGRAM_BIN, HISTOGRAM_BIN)
    edges[-1] = SCORE_MAX + 1  # the last bin holds 850
    counts = {}
    for key in TIER_KEYS:
        values = score[(tier == key).to_numpy()]
        counts[key] = np.histogram(values, bins=edges)[0].tolist()
    return {"bin_edges": edges.tolist(), "counts": counts}


def calibration_by_tier(y: np.ndarray, p: np.ndarray, tier: pd.Series) -> list[dict]:
    """Predicted against observed default rate per tier, with a 95 % Clopper-Pearson interval."""
    out = []
    for key in TIER_KEYS:
        sel = (tier == key).to_numpy()
        n = int(sel.sum())
        if n == 0:
            out.append({"tier": key, "n": 0, "mean_predicted": None,
                        "observed_default_rate": None, "ci_low": None, "ci_high": None})
            continue
        bad = int(y[sel].sum())
        low, high = clopper_pearson(bad, n, 0.05)
        out.append({"tier": key, "n": n, "mean_predicted": float(p[sel].mean()),
                    "observed_default_rate": bad / n, "ci_low": float(low),
                    "ci_high": float(high)})
    return out


def build_curves(scores: pd.DataFrame, y: np.ndarray) -> dict:
    """curves.json from the run's scores (in position order) and the labels of those people;
    people without a score (ineligible) are left out."""
    scored = scores["score"].notna().to_numpy()
    scores, y = scores[scored], np.asarray(y)[scored]
    test = (scores["split"] == "test").to_numpy()
    p = scores["probability"].to_numpy(dtype=np.float64)
    score = scores["score"].to_numpy(dtype=np.int64)
    tier = scores["tier"].astype(str)
    out = {
        "roc": roc(y[test], p[test]),
        "ks": ks_curve(y[test], score[test]),
        "score_histogram": score_histogram(score, tier),
        "calibration_by_tier": calibration_by_tier(y[test], p[test], tier[test]),
    }
    if "reason_1" in scores:
        out["reasons"] = reason_counts(scores)
    return out


def reason_counts(scores: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per `silo.feature`: how many scored people have it as their first reason and among
    their reasons, and the mean points it costs them when listed (aggregates only)."""
    slots = [c for c in scores if c.startswith("reason_") and not c.endswith("_points")]
    codes = pd.concat([scores[c].astype(str).where(scores[c].notna()) for c in slots])
    points = pd.concat([scores[f"{c}_points"] for c in slots])
    listed = pd.DataFrame({"code": codes.to_numpy(), "points": points.to_numpy()}).dropna()
    first = scores["reason_1"].value_counts()
    stats = listed.groupby("code")["points"].agg(["size", "mean"])
    return {str(code): {"first": int(first.get(code, 0)), "listed": int(row["size"]),
                        "mean_points": float(row["mean"])}
            for code, row in stats.sort_values("size", ascending=False).iterrows()}
