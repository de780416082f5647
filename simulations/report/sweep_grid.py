"""A sweep's grid points as the report names, summarises and compares them: labels, the
reference point, the interval method, each model's summary per grid point."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from simulations.data.paths import EPSILON_KEY
from simulations.report.blocks import (
    fmt_eps,
)
from simulations.report.load import SweepData
from simulations.report.stats import mean_ci

# ---- grid points ---------------------------------------------------------------------------

# The summary.csv columns of the paired differences against the reference grid point.
DIFF = ("auc_diff_mean", "auc_diff_ci_low", "auc_diff_ci_high")
DIFF_COLUMNS = (*DIFF, "auc_diff_n", "reference", "is_reference", "interval")
# One colour per series of a grid sweep (the federated model at each value of the other keys).
GRID_COLOURS = ("#1f4e79", "#c0392b", "#27ae60", "#8e44ad", "#e67e22", "#16a085", "#7f8c8d",
                "#d4ac0d", "#2c3e50", "#e84393")
DEFAULT_INTERVAL = "95 % confidence intervals over seeds"
REFERENCE_GID = "reference-line"  # marks the lines listed last in a legend
ORACLE_STYLES = ("--", ":", "-.")


def value_text(value: object) -> str:
    """A grid value as the sweep was given it: 0.003, 1, ∞, adam."""
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        v = float(value)
        # Whole numbers in full (20000 people, not 2e+04); others as given (0.003).
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else fmt_eps(v)
    return str(value)


def point_label(columns: Sequence[str], values: Sequence[object]) -> str:
    """A grid point as "ε=1, train.lr=0.003"."""
    return ", ".join(f"{'ε' if c == 'epsilon' else c}={value_text(v)}"
                     for c, v in zip(columns, values, strict=True))


def varies(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].nunique(dropna=False) > 1


def other_keys(sweep: SweepData) -> list[str]:
    return [g for g in sweep.groups if g != "epsilon"]


def x_key(sweep: SweepData) -> str:
    """The curve's x-axis: epsilon when the sweep varies it, else its first grid key that
    varies (a sweep over train.lr at one budget is a curve over train.lr)."""
    if varies(sweep.runs, "epsilon"):
        return "epsilon"
    return next((k for k in other_keys(sweep) if varies(sweep.runs, k)), "epsilon")


def interval_text(sweep: SweepData) -> str:
    """The interval method summary.csv names (one text per sweep), or the old sweeps' one."""
    if "interval" not in sweep.summary:
        return DEFAULT_INTERVAL
    texts = list(sweep.summary["interval"].dropna().astype(str).unique())
    # The reference row's text is the others' without the pairing: say each method once.
    kept = [t for t in texts if not any(o != t and o.startswith(t) for o in texts)]
    return "; ".join(kept) if kept else DEFAULT_INTERVAL


def is_reference(summary: pd.DataFrame) -> pd.Series:
    if "is_reference" not in summary:
        return pd.Series(False, index=summary.index)
    return summary["is_reference"].map(lambda v: str(v).strip().lower() in ("true", "1", "yes"))


def reference_text(sweep: SweepData) -> str | None:
    """The reference grid point as "ε=∞, train.lr=0.003", from summary.csv's reference row,
    else sweep.json, else summary.csv's `reference` (the cell-name prefix)."""
    rows = sweep.summary[is_reference(sweep.summary)]
    if len(rows):
        return point_label(sweep.groups, [rows.iloc[0][g] for g in sweep.groups])
    reference = sweep.config.get("reference")
    if isinstance(reference, dict) and reference:
        return ", ".join(f"{'ε' if k == EPSILON_KEY else k}={'∞' if v == 'inf' else v}"
                         for k, v in reference.items())
    if "reference" in sweep.summary:
        names = sweep.summary["reference"].dropna().astype(str).unique()
        return names[0] if len(names) else None
    return None


def summary_series(sweep: SweepData, name: str) -> pd.DataFrame | None:
    """(grid columns..., mean, ci_low, ci_high) of one model's AUC at each grid point.

    Read from summary.csv; when it lacks that model's columns, computed from sweep.csv's done
    runs (the same Student t interval, report/stats.py). Every row is one grid point: never a
    pool of several."""
    groups = list(sweep.groups)
    prefixes = ["auc"] if name == "auc" else [f"auc_{name}", name, f"{name}_auc"]
    s = sweep.summary
    for p in prefixes:
        cols = [f"{p}_mean", f"{p}_ci_low", f"{p}_ci_high"]
        if all(c in s.columns for c in cols):
            frame = s[[*groups, *cols]].set_axis([*groups, "mean", "ci_low", "ci_high"], axis=1)
            for c in ("mean", "ci_low", "ci_high"):
                frame[c] = pd.to_numeric(frame[c], errors="coerce")
            frame = frame.dropna(subset=["mean"]).reset_index(drop=True)
            return frame if len(frame) else None
    column = "auc" if name == "auc" else f"auc_{name}"
    done = sweep.runs[sweep.runs["status"].astype(str) == "done"]
    if column not in done.columns:
        return None
    rows = [{**dict(zip(groups, key if isinstance(key, tuple) else (key,), strict=True)),
             **dict(zip(("mean", "ci_low", "ci_high"), mean_ci(part[column]), strict=True))}
            for key, part in done.groupby(groups, dropna=False, sort=True)]
    frame = pd.DataFrame(rows, columns=[*groups, "mean", "ci_low", "ci_high"])
    frame = frame.dropna(subset=["mean"]).reset_index(drop=True)
    return frame if len(frame) else None
