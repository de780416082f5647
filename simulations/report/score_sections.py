"""The scores section of a run's report: the score histogram by tier, calibration by tier
(with Wilson intervals), the KS and ROC curves; from curves.json, or for older runs from the
published scores where that can be done without labels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from server.scoring import SCORE_MAX, SCORE_MIN, TIER_KEYS, TIERS
from simulations.report.blocks import (
    SCORED,
    SERIES,
    TIER_COLOURS,
    Z95,
    Note,
    Plot,
    Section,
    Table,
    figure,
    fmt,
)
from simulations.report.load import Curves, RunData


def _histogram_data(run: RunData) -> tuple[pd.DataFrame | None, str]:
    if run.curves is not None and run.curves.histogram is not None:
        return run.curves.histogram, "Everyone scored, from curves.json."
    if run.scores is None:
        return None, run.scores_note
    # Older runs lack curves.json: count the published test scores directly.
    test = run.scores[run.scores["split"].astype(str) == "test"]
    edges = np.arange(SCORE_MIN, SCORE_MAX + 1, 10, dtype=np.float64)
    frame = pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:]})
    for key in TIER_KEYS:
        values = test.loc[test["tier"].astype(str) == key, "score"].to_numpy()
        frame[key] = np.histogram(values, bins=edges)[0]
    return frame, "Test split, counted from scores.parquet (the run has no curves.json)."


def _histogram_plot(data: pd.DataFrame, note: str) -> Plot:
    fig, ax = figure()
    left = data["bin_low"].to_numpy()
    width = (data["bin_high"] - data["bin_low"]).to_numpy()
    bottom = np.zeros(len(data))
    for tier in TIERS:
        counts = data[tier.key].to_numpy()
        ax.bar(left, counts, width=width, bottom=bottom, align="edge", color=TIER_COLOURS[tier.key],
               label=f"{tier.key} ({tier.low}–{tier.high})", edgecolor="white", linewidth=0.3)
        bottom = bottom + counts
    ax.set_xlabel("score")
    ax.set_ylabel("people")
    ax.set_xlim(SCORE_MIN, SCORE_MAX)
    ax.legend(frameon=False, fontsize="small")
    return Plot("score_histogram", "Score distribution coloured by tier", fig=fig,
                data=data, note=note,
                alt="Stacked histogram of scores from 300 to 850, each bar coloured by tier "
                    "(watch, fair, good, excellent, exceptional).")


def _calibration_data(run: RunData) -> tuple[pd.DataFrame | None, str]:
    if run.curves is not None and run.curves.calibration is not None:
        return run.curves.calibration, (f"{SCORED.capitalize()}, from curves.json; 95 % "
                                         "intervals.")
    rates = run.metrics.get("test_default_rate_by_tier")
    if run.scores is None or not rates:
        return None, run.scores_note or "metrics.json has no default rate by tier"
    test = run.scores[run.scores["split"].astype(str) == "test"]
    rows = []
    for key in TIER_KEYS:
        part = test[test["tier"].astype(str) == key]
        n, rate = len(part), rates.get(key)
        if n == 0 or rate is None:
            continue
        low, high = wilson(rate, n)
        rows.append({"tier": key, "n": n, "mean_predicted": float(part["probability"].mean()),
                     "observed_default_rate": rate, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows), (f"{SCORED.capitalize()}: predictions from scores.parquet, "
                                "observed rates from metrics.json, Wilson 95 % intervals.")


def wilson(rate: float, n: int) -> tuple[float, float]:
    """Wilson score interval (95 %) for a binomial proportion."""
    denom = 1 + Z95**2 / n
    centre = (rate + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(rate * (1 - rate) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _calibration_plot(data: pd.DataFrame, note: str) -> Plot:
    fig, ax = figure(5.6, 4.4)
    pred, obs = data["mean_predicted"].to_numpy(), data["observed_default_rate"].to_numpy()
    low, high = data["ci_low"].to_numpy(), data["ci_high"].to_numpy()
    for i, key in enumerate(data["tier"]):
        ax.errorbar(pred[i], obs[i], yerr=[[obs[i] - low[i]], [high[i] - obs[i]]], fmt="o",
                    color=TIER_COLOURS.get(str(key), "#333333"), capsize=3, label=str(key))
    # Linear axes in every report: a tier without defaults (rate 0, interval from 0) has no
    # place on a log axis, and switching by the data would draw runs on different scales.
    hi = min(1.0, float(np.nanmax(np.concatenate([pred, high]))) * 1.05)
    ax.set_xlim(-0.02 * hi, hi)  # a margin: the safest tiers sit near 0 and stay visible
    ax.set_ylim(-0.02 * hi, hi)
    ax.plot([0, hi], [0, hi], color="#999999", linestyle="--", linewidth=1,
            label="perfect calibration")
    ax.set_xlabel("mean predicted default probability")
    ax.set_ylabel("observed default rate")
    ax.legend(frameon=False, fontsize="small")
    return Plot("calibration_by_tier", f"Calibration by tier ({SCORED})", fig=fig,
                data=data, note=note,
                alt="Scatter plot on linear axes of observed default rate against mean "
                    "predicted probability for each tier, with 95 % confidence intervals and "
                    "the diagonal of perfect calibration.")


def _ks_plot(data: pd.DataFrame, ks: float | None) -> Plot:
    fig, ax = figure()
    ax.plot(data["score"], data["cdf_bad"], label="defaulters", color="#c0392b")
    ax.plot(data["score"], data["cdf_good"], label="repayers", color="#27ae60")
    gap = (data["cdf_bad"] - data["cdf_good"]).abs()
    at = int(gap.to_numpy().argmax())
    s = float(data["score"].iloc[at])
    ax.vlines(s, data["cdf_good"].iloc[at], data["cdf_bad"].iloc[at], color="#333333",
              linestyle="--", label=f"largest gap {gap.iloc[at]:.3f} at score {s:g}")
    ax.set_xlabel("score")
    ax.set_ylabel("cumulative share")
    ax.legend(frameon=False)
    return Plot("ks_curve", f"KS curve: cumulative score distributions ({SCORED})",
                fig=fig, data=data,
                note=f"KS on the probabilities of the same people (metrics.json ks): {fmt(ks)}; "
                     "the curve reads the score in 5-point steps, so its largest gap can be "
                     "a little smaller.",
                alt=f"Cumulative distribution of scores for defaulting and repaying scored test "
                    f"people; the largest gap, {gap.iloc[at]:.3f}, is at score {s:g}.")


def _roc_plot(data: pd.DataFrame, auc: float | None) -> Plot:
    fig, ax = figure(4.8, 4.4)
    ax.plot(data["fpr"], data["tpr"], color=SERIES["federated"][1],
            label=f"federated, {SCORED} (AUC {fmt(auc)})")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(frameon=False, loc="lower right")
    return Plot("roc_curve", f"ROC curve ({SCORED})", fig=fig, data=data,
                note=f"AUC: metrics.json auc, on the same {SCORED} as the curve.",
                alt=f"ROC curve of the federated model on the {SCORED}, AUC {fmt(auc)}, above "
                    "the chance line.")


def scores_section(run: RunData) -> Section:
    section = Section("scores", "Scores: distribution, calibration, KS")
    hist, note = _histogram_data(run)
    section.blocks.append(_histogram_plot(hist, note) if hist is not None else
                          Note(f"Score histogram not available: {note}."))
    calib, note = _calibration_data(run)
    if calib is not None and not calib.empty:
        section.blocks.append(_calibration_plot(calib, note))
        section.blocks.append(Table("calibration", f"Calibration by tier ({SCORED})", calib,
                                    note=note, data_key="calibration_by_tier"))
    else:
        section.blocks.append(Note(f"Calibration by tier not available: {note}."))
    curves = run.curves or Curves()
    section.blocks.append(_ks_plot(curves.ks, run.metrics.get("ks"))
                          if curves.ks is not None and len(curves.ks) else
                          Note(f"KS curve not available: {curves_missing(run, 'ks')}."))
    section.blocks.append(_roc_plot(curves.roc, run.metrics.get("auc"))
                          if curves.roc is not None and len(curves.roc) else
                          Note(f"ROC curve not available: {curves_missing(run, 'roc')}."))
    return section


def curves_missing(run: RunData, part: str) -> str:
    if run.curves is None:
        if part in ("ks", "roc"):
            # Not recomputable here: these need the labels, which a run never publishes.
            return "the run has no curves.json (the curve needs labels the run does not publish)"
        return "the run has no curves.json"
    return f"curves.json has no {part!r}"
