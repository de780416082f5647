"""The sections of a sweep's report: the privacy-utility curve, the paired differences
against the reference grid point, the audit against accounting, the headline and the tables
behind them.

A sweep varies a grid of config keys (sweep.json "grid"; an old sweep only epsilon). Every
figure and table keeps its grid points apart: the curve has one series per value of the keys
other than its x-axis, and no number is a mean over different grid points."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from simulations.data.paths import EPSILON_KEY
from simulations.report.blocks import (
    SERIES,
    Block,
    Cards,
    Note,
    Plot,
    Section,
    Table,
    dodge,
    eps_axis,
    figure,
    flatten,
    fmt,
    fmt_eps,
    fmt_interval,
    key_values,
)
from simulations.report.load import SweepData, same_value
from simulations.report.run_sections import ALL, SCORED, run_sections
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


def _varies(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].nunique(dropna=False) > 1


def _others(sweep: SweepData) -> list[str]:
    return [g for g in sweep.groups if g != "epsilon"]


def _x_key(sweep: SweepData) -> str:
    """The curve's x-axis: epsilon when the sweep varies it, else its first grid key that
    varies (a sweep over train.lr at one budget is a curve over train.lr)."""
    if _varies(sweep.runs, "epsilon"):
        return "epsilon"
    return next((k for k in _others(sweep) if _varies(sweep.runs, k)), "epsilon")


def _interval_text(sweep: SweepData) -> str:
    """The interval method summary.csv names (one text per sweep), or the old sweeps' one."""
    if "interval" not in sweep.summary:
        return DEFAULT_INTERVAL
    texts = list(sweep.summary["interval"].dropna().astype(str).unique())
    # The reference row's text is the others' without the pairing: say each method once.
    kept = [t for t in texts if not any(o != t and o.startswith(t) for o in texts)]
    return "; ".join(kept) if kept else DEFAULT_INTERVAL


def _is_reference(summary: pd.DataFrame) -> pd.Series:
    if "is_reference" not in summary:
        return pd.Series(False, index=summary.index)
    return summary["is_reference"].map(lambda v: str(v).strip().lower() in ("true", "1", "yes"))


def _reference_text(sweep: SweepData) -> str | None:
    """The reference grid point as "ε=∞, train.lr=0.003", from summary.csv's reference row,
    else sweep.json, else summary.csv's `reference` (the cell-name prefix)."""
    rows = sweep.summary[_is_reference(sweep.summary)]
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


# ---- the privacy-utility curve ---------------------------------------------------------------

# The privacy-utility curve's series: summary name -> (label, colour, population). The score's
# AUC is on the scored test people; the model's, its baselines' and the oracle's on all.
CURVES = {
    "auc": (f"{SERIES['federated'][0]}, {SCORED}", SERIES["federated"][1], SCORED),
    "all_test": (f"{SERIES['federated'][0]}, {ALL}", "#5dade2", ALL),
    "central_dp": (*SERIES["central_dp"], ALL),
    "best_silo": (*SERIES["best_silo"], ALL),
}
LINES = {name: (*SERIES[name], ALL) for name in ("central", "central_gbdt", "oracle")}


@dataclass(frozen=True, kw_only=True)
class XAxis:
    """Where a grid value sits on the curve's x-axis."""

    key: str
    place: Callable[[pd.Series], np.ndarray]
    joined: bool  # numbers: points joined by a line; categories: points with their interval


def _x_axis(ax: Axes, key: str, values: pd.Series, listed: Sequence[str] = ()) -> XAxis:
    """Positive numbers (budgets, learning rates, epochs) on a log axis with ∞ at the right;
    anything else as categories in the order the sweep lists them."""
    numbers = pd.to_numeric(values, errors="coerce")
    if key == "epsilon" or (numbers.notna().all() and (numbers > 0).all()):
        to_x = eps_axis(ax, numbers.to_numpy(dtype=np.float64))
        if key != "epsilon":
            ax.set_xlabel(f"{key} (log scale)")
        return XAxis(key=key, joined=True, place=lambda v: to_x(
            pd.to_numeric(v, errors="coerce").to_numpy(dtype=np.float64)))
    present = list(values.dropna().astype(str).unique())
    order = [v for v in listed if v in present] + sorted(v for v in present if v not in listed)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_xlabel(key)
    return XAxis(key=key, joined=False,
                 place=lambda v: np.array([order.index(str(x)) for x in v], dtype=np.float64))


def _draw_curve(ax: Axes, frame: pd.DataFrame, axis: XAxis, label: str, colour: str,
                dodge: float = 0.0) -> None:
    """One series: joined points with a band, or points with bars. `dodge` moves it sideways
    (in category widths, or decades on a log axis) so that series' bars do not overlap."""
    x = axis.place(frame[axis.key])
    if not axis.joined:
        mean = frame["mean"].to_numpy(dtype=np.float64)
        ax.errorbar(x + dodge, mean, yerr=_yerr(frame), fmt="o", color=colour, capsize=3,
                    label=label)
        return
    x = x * 10.0 ** dodge
    finite = np.isfinite(pd.to_numeric(frame[axis.key]).to_numpy(dtype=np.float64))
    f = frame[finite]
    if len(f) == 1:  # a band needs two points: one budget gets its bar
        ax.errorbar(x[finite], f["mean"], yerr=_yerr(f), fmt="o", color=colour, capsize=3,
                    label=label)
    elif len(f):
        ax.plot(x[finite], f["mean"], marker="o", color=colour, label=label)
        ax.fill_between(x[finite], f["ci_low"], f["ci_high"], color=colour, alpha=0.15)
    inf = frame[~finite]
    if len(inf):
        # The non-private point stands alone: joining it to the curve would invent a slope.
        ax.errorbar(x[~finite], inf["mean"], yerr=_yerr(inf), fmt="s", color=colour,
                    capsize=3, label=None if len(f) else label)


def _yerr(frame: pd.DataFrame) -> np.ndarray:
    mean = frame["mean"].to_numpy(dtype=np.float64)
    low = np.nan_to_num(mean - frame["ci_low"].to_numpy(dtype=np.float64))
    high = np.nan_to_num(frame["ci_high"].to_numpy(dtype=np.float64) - mean)
    return np.vstack([low, high])


def _reference_line(ax: Axes, frame: pd.DataFrame, axis: XAxis, label: str, colour: str,
                    linestyle: str = "--") -> None:
    """A model that does not depend on ε (central baselines, the oracle): one horizontal line
    on a privacy-utility curve; against another key, a dashed curve (it may depend on it)."""
    if axis.key == "epsilon":
        line = ax.axhline(float(frame["mean"].mean()), color=colour, linestyle=linestyle,
                          linewidth=1.3, label=label)
    else:
        x = axis.place(frame[axis.key])
        order = np.argsort(x, kind="stable")
        (line,) = ax.plot(x[order], frame["mean"].to_numpy()[order],
                          linestyle=linestyle if axis.joined else "none",
                          marker=None if axis.joined else "_", markersize=14, color=colour,
                          linewidth=1.3, label=label)
    line.set_gid(REFERENCE_GID)


def _series_keys(sweep: SweepData, x: str) -> list[str]:
    """The grid keys that split the curve into series: every varying key but the x-axis's."""
    return [k for k in _others(sweep) if k != x and _varies(sweep.runs, k)]


def _privacy_utility(sweep: SweepData) -> Plot | Note:
    series = {n: summary_series(sweep, n) for n in (*CURVES, *LINES)}
    fed = series["auc"]
    if fed is None:
        return Note("Privacy–utility curve not available: no federated AUC in the sweep.")
    x = _x_key(sweep)
    by = _series_keys(sweep, x)
    fig, ax = figure(7.2, 4.4)
    shown = [f for f in series.values() if f is not None]
    axis = _x_axis(ax, x, pd.concat([f[x] for f in shown], ignore_index=True),
                   _listed(sweep, x))
    styles = {**CURVES, **LINES}
    if by:
        drawn = {n: f for n in ("auc", "oracle") if (f := series[n]) is not None}
        _draw_grid_series(ax, fed, series["oracle"], axis, by)
    else:
        drawn = {n: f for n, f in series.items() if f is not None}
        curves = [(series[n], style) for n, style in CURVES.items() if series[n] is not None]
        for i, (frame, (label, colour, _)) in enumerate(curves):
            _draw_curve(ax, frame, axis, label, colour,
                        0.0 if axis.joined else dodge(i, len(curves), 0.08))
        for name, (label, colour, _) in LINES.items():
            if series[name] is not None:
                _reference_line(ax, series[name], axis, label, colour)
    ax.set_ylabel("test AUC")
    # In drawing order (matplotlib lists bars after lines): the series, then reference lines.
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (_is_reference_line(handles[i]), i))
    # Outside the axes: inside, it would cover the non-private points at the right edge.
    ax.legend([handles[i] for i in order], [labels[i] for i in order], frameon=False,
              fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    rows = [frame.assign(series=styles[name][0], population=styles[name][2])
            for name, frame in drawn.items()]
    data = pd.concat(rows, ignore_index=True)[
        ["series", "population", *sweep.groups, "mean", "ci_low", "ci_high"]]
    absent = [] if by else [styles[n][0] for n, f in series.items() if f is None]
    title = ("Privacy–utility: test AUC against ε" if x == "epsilon"
             else f"Test AUC against {x}")
    return Plot("privacy_utility", title, fig=fig, data=data,
                note=_curve_note(sweep, x, by, absent, joined=axis.joined),
                alt=_curve_alt(x, by, axis.joined))


def _is_reference_line(handle: object) -> bool:
    return isinstance(handle, Line2D) and handle.get_gid() == REFERENCE_GID


def _curve_alt(x: str, by: list[str], joined: bool) -> str:
    against = "the privacy budget epsilon" if x == "epsilon" else x
    return (f"{'Line' if joined else 'Dot'} chart of test AUC against {against}"
            f"{' on a log axis' if joined else ''}, with 95 % confidence "
            f"{'bands' if joined else 'bars'}"
            + (f", one series per value of {', '.join(by)}" if by
               else " for the federated model and its baselines")
            + ("; the non-private point sits at the right edge, labelled infinity."
               if x == "epsilon" else "."))


def _draw_grid_series(ax: Axes, fed: pd.DataFrame, oracle: pd.DataFrame | None, axis: XAxis,
                      by: list[str]) -> None:
    """One line and band per combination of the other grid keys (the federated model's
    scored AUC), and the oracle once per value of the keys it depends on (the population's,
    say; one line when it is the same everywhere). Baselines are left out: with several
    series they would bury them."""
    parts = list(fed.groupby(by, sort=True, dropna=False))
    spread = 0.02 if axis.joined else 0.08
    for i, (values, part) in enumerate(parts):
        _draw_curve(ax, part, axis, point_label(by, _tuple(values)),
                    GRID_COLOURS[i % len(GRID_COLOURS)], dodge(i, len(parts), spread))
    if oracle is None:
        return
    keys = [k for k in by if _depends_on(oracle, k, [*by, axis.key])]
    colour = SERIES["oracle"][1]
    if not keys:
        _reference_line(ax, oracle, axis, SERIES["oracle"][0], colour)
        return
    for i, (values, part) in enumerate(oracle.groupby(keys, sort=True, dropna=False)):
        _reference_line(ax, part, axis, f"oracle, {point_label(keys, _tuple(values))}", colour,
                        ORACLE_STYLES[i % len(ORACLE_STYLES)])


def _tuple(values: object) -> tuple:
    return values if isinstance(values, tuple) else (values,)


def _depends_on(frame: pd.DataFrame, key: str, columns: list[str]) -> bool:
    """Whether `frame`'s mean changes with `key` when every other of `columns` is held."""
    held = [c for c in columns if c != key]
    spread = frame.groupby(held, dropna=False)["mean"].agg(np.ptp) if held else \
        pd.Series([np.ptp(frame["mean"].to_numpy(dtype=np.float64))])
    return bool((spread > 1e-12).any())


def _listed(sweep: SweepData, column: str) -> list[str]:
    """A grid key's values in the order sweep.json lists them."""
    grid = sweep.config.get("grid")
    values = grid.get(EPSILON_KEY if column == "epsilon" else column) \
        if isinstance(grid, dict) else None
    return [str(v) for v in values] if isinstance(values, list) else []


def _curve_note(sweep: SweepData, x: str, by: list[str], absent: list[str], *,
                joined: bool) -> str:
    fixed = [k for k in _others(sweep) if k != x and k not in by]
    note = (f"Federated, {SCORED}: summary.csv auc (metrics.json auc), the people the score "
            f"serves; every other series on {ALL}, the ineligible included (the baselines and "
            "the oracle see no opening conditions). "
            f"Bands and bars: {_interval_text(sweep)}.")
    if x == "epsilon":
        note += " ∞ is the non-private run."
    else:
        eps = sweep.runs["epsilon"].dropna().unique()
        budget = f"ε = {fmt_eps(float(eps[0]))}" if len(eps) == 1 else "one budget"
        drawn = ("on a log axis" if joined else
                 "as a point with its interval per value, in the sweep's order")
        marks = "dashed curves" if joined else "short horizontal marks"
        note += (f" The sweep holds {budget} and varies {x}, so AUC is drawn against {x} "
                 f"({drawn}); models that do not depend on ε are drawn as {marks}, since "
                 f"they may depend on {x}.")
    if by:
        note += (f" One series per value of {', '.join(by)}: the federated model on "
                 f"{SCORED} at each grid point (points are never pooled across "
                 f"{', '.join(by)}); the baselines are left out to keep the lines apart and "
                 "are in the summary table. The oracle is drawn once per value of the grid "
                 "keys it depends on (once when it is the same everywhere).")
    if fixed:
        values = [f"{k}={value_text(sweep.runs[k].dropna().iloc[0])}" for k in fixed
                  if sweep.runs[k].notna().any()]
        if values:
            note += f" Grid keys with a single value: {', '.join(values)}."
    if absent:
        note += f" Not in this sweep: {', '.join(absent)}."
    return note


# ---- paired differences ----------------------------------------------------------------------


def _paired_differences(sweep: SweepData) -> list[Block]:
    """summary.csv's paired differences in the federated AUC against the reference grid
    point: a table with the interval method, and a figure of each difference with its
    interval around zero."""
    summary = sweep.summary
    if not all(c in summary for c in DIFF):
        return [Note("Paired differences not available: summary.csv has no auc_diff_* "
                     "columns (a sweep written before paired differences existed).")]
    reference = _reference_text(sweep) or "the reference grid point"
    rows = summary[~_is_reference(summary)]
    cols = [*sweep.groups, *(c for c in ("n", *DIFF, "auc_diff_n") if c in summary)]
    frame = rows[cols].reset_index(drop=True)
    for c in DIFF:
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    if "auc_diff_n" in frame:
        # A count (float in summary.csv, where the reference row leaves it empty).
        pairs = pd.to_numeric(frame["auc_diff_n"], errors="coerce")
        if pairs.notna().all() and (pairs % 1 == 0).all():
            frame["auc_diff_n"] = pairs.astype(np.int64)
    method = _interval_text(sweep)
    title = f"Paired differences in federated AUC ({SCORED}) against {reference}"
    note = (f"Difference: the grid point's AUC minus the reference's ({reference}), over the "
            "runs both finished with the same seeds (auc_diff_n pairs; n: runs at the grid "
            f"point). Interval: {method}.")
    plot = _difference_plot(frame, sweep.groups, reference, method)
    table = Table("sweep_paired_differences", title, frame, note=note,
                  data_key=plot.key if isinstance(plot, Plot) else "")
    return [plot, table]


def _difference_plot(frame: pd.DataFrame, groups: Sequence[str], reference: str,
                     method: str) -> Plot | Note:
    points = frame.dropna(subset=["auc_diff_mean"]).reset_index(drop=True)
    if points.empty:
        return Note("Paired-difference figure not available: no grid point has runs paired "
                    "with the reference's.")
    labels = [point_label(groups, [row[g] for g in groups]) for _, row in points.iterrows()]
    fig, ax = figure(7.2, max(2.2, 0.4 * len(points) + 1.3))
    y = np.arange(len(points))[::-1]  # the first grid point at the top
    mean = points["auc_diff_mean"].to_numpy(dtype=np.float64)
    low = np.nan_to_num(mean - points["auc_diff_ci_low"].to_numpy(dtype=np.float64))
    high = np.nan_to_num(points["auc_diff_ci_high"].to_numpy(dtype=np.float64) - mean)
    ax.axvline(0.0, color="#555555", linewidth=1)
    ax.errorbar(mean, y, xerr=np.vstack([low, high]), fmt="o", color=SERIES["federated"][1],
                capsize=3)
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"AUC difference, grid point − reference ({SCORED})")
    return Plot("paired_differences", f"Paired differences in AUC against {reference}",
                fig=fig, data=frame,
                note=f"Each point: the mean paired difference with its interval ({method}); "
                     "an interval that crosses the zero line shows no difference at that "
                     "level. A point without bars has too few pairs for an interval.",
                alt="Dot plot of the paired AUC difference against the reference grid point, "
                    "one row per grid point with its confidence interval, and a vertical line "
                    "at zero.")


# ---- audit, headline, tables -----------------------------------------------------------------


def _sweep_audit(sweep: SweepData) -> Plot | Note:
    done = sweep.runs[sweep.runs["status"].astype(str) == "done"]
    cols = [c for c in ("eps_model", "audit_epsilon_lower", "audit_attack_auc") if c in done]
    lower = pd.to_numeric(done.get("audit_epsilon_lower", pd.Series(dtype=float)),
                          errors="coerce")
    if lower.isna().all():
        return Note("Audit against ε not available: sweep.csv has no audit_epsilon_lower.")
    seeds = [c for c in ("data_seed", "seed") if c in done]
    data = done[[*sweep.groups, *seeds, *cols]].copy()
    fig, ax = figure(7.2, 4.2)
    to_x = eps_axis(ax, data["epsilon"].to_numpy(dtype=np.float64))
    x = to_x(data["epsilon"].to_numpy(dtype=np.float64))
    if "eps_model" in data:
        ax.plot(x, pd.to_numeric(data["eps_model"], errors="coerce"), "o", color="#1f4e79",
                label="accounted ε (combined model)")
    ax.plot(x, lower, "D", color="#e67e22", label="empirical ε lower bound (audit)")
    finite = np.unique(data["epsilon"][np.isfinite(data["epsilon"])])
    if finite.size:
        ax.plot(finite, finite, color="#999999", linestyle="--", linewidth=1, label="ε = target")
    ax.set_ylabel("ε")
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    others = _others(sweep)
    every = f" (every value of {', '.join(others)})" if others else ""
    return Plot("sweep_audit", "Audit: empirical lower bound and accounted ε against target ε",
                fig=fig, data=data,
                note=f"One marker per run{every}; non-private runs have no accounted ε.",
                alt="Scatter plot against the target epsilon (log axis, infinity at the right): "
                    "the accounted epsilon per run and the audit's empirical lower bound, with "
                    "the diagonal epsilon equals target.")


def _headline_sweep(sweep: SweepData) -> Section:
    runs = sweep.runs
    status = runs["status"].astype(str)
    auc = summary_series(sweep, "auc")
    done = int((status == "done").sum())
    items = [("runs done", f"{done} of {len(runs)}"),
             ("budgets ε", ", ".join(fmt_eps(e) for e in sorted(runs["epsilon"].unique())))]
    items += [(f"grid {k}", ", ".join(value_text(v) for v in _sorted_values(runs[k])))
              for k in _others(sweep)]
    if "data_seed" in runs:
        paired = (pd.to_numeric(runs["data_seed"], errors="coerce") == runs["seed"]).all()
        items.append(("data seeds (population.seed)",
                      ", ".join(fmt(s) for s in _sorted_values(runs["data_seed"]))
                      + (" (each run's population seed is its training seed)" if paired
                         else "")))
    items.append(("training seeds" if "data_seed" in runs else "seeds",
                  ", ".join(fmt(s) for s in sorted(runs["seed"].unique()))))
    reference = _reference_text(sweep) if any(c in sweep.summary for c in DIFF) else None
    if reference:
        items.append(("reference grid point (paired differences)", reference))
    cards = [("runs done", f"{done} / {len(runs)}")]
    at_reference = _at_reference(sweep)
    for _, row in (auc if auc is not None else pd.DataFrame()).iterrows():
        point = point_label(sweep.groups, [row[g] for g in sweep.groups])
        items.append((f"federated AUC ({SCORED}) at {point}",
                      fmt_interval(row["mean"], row["ci_low"], row["ci_high"])))
        # Cards only for the headline budgets (the default, 1, and the non-private point) at
        # the reference's value of every other grid key.
        if row["epsilon"] in (1.0, math.inf) and at_reference(row):
            cards.append((f"AUC, {SCORED}, at {point}", fmt(row["mean"])))
    frame = pd.DataFrame(items, columns=["quantity", "value"])
    return Section("headline", "Headline numbers", [
        Cards(cards),
        Table("sweep_headline", f"Sweep at a glance ({_interval_text(sweep)})", frame),
    ])


def _sorted_values(column: pd.Series) -> list:
    values = list(column.dropna().unique())
    try:
        return sorted(values)
    except TypeError:  # mixed types: as they come
        return values


def _at_reference(sweep: SweepData) -> Callable[[pd.Series], bool]:
    """Whether a summary row holds the reference's value of every grid key but epsilon (a
    sweep without a reference: each key's first value)."""
    reference = sweep.config.get("reference")
    grid = sweep.config.get("grid")
    wanted: dict[str, str] = {}
    for k in _others(sweep):
        if isinstance(reference, dict) and k in reference:
            wanted[k] = str(reference[k])
        elif isinstance(grid, dict) and grid.get(k):
            wanted[k] = str(grid[k][0])
    return lambda row: all(same_value(row[k], v) for k, v in wanted.items())


def _sweep_tables(sweep: SweepData) -> Section:
    failed = int((sweep.runs["status"].astype(str) != "done").sum())
    populations = (f"auc: {SCORED} (metrics.json auc); every other AUC column (all_test, the "
                   f"baselines', the oracle's): {ALL}.")
    groups = list(sweep.groups)
    # The paired differences have their own table; the method is said once, in the note.
    summary = sweep.summary[[*groups, *(c for c in sweep.summary.columns
                                        if c not in groups and c not in DIFF_COLUMNS)]]
    seeds = [c for c in ("data_seed", "seed") if c in sweep.runs]
    runs = sweep.runs[[*groups, *seeds, *(c for c in sweep.runs.columns
                                          if c not in groups and c not in seeds)]]
    per = "ε" if groups == ["epsilon"] else "grid point (" + ", ".join(
        "ε" if g == "epsilon" else g for g in groups) + ")"
    return Section("sweep-tables", "Sweep table and summary", [
        Table("sweep_summary", f"Summary per {per} (mean and 95 % interval over seeds)",
              summary, note=populations + (f" Intervals: {_interval_text(sweep)}."
                                           if "interval" in sweep.summary else "")),
        Table("sweep_runs", "Every run of the sweep", runs, collapsed=len(runs) > 20,
              note=populations + (f" {failed} run(s) failed and are left out of the figures."
                                  if failed else "")),
    ])


def sweep_sections(sweep: SweepData) -> list[Section]:
    sections = [
        _headline_sweep(sweep),
        Section("privacy-utility", "Privacy–utility curve", [_privacy_utility(sweep)]),
        Section("paired-differences", "Paired differences", _paired_differences(sweep)),
        Section("sweep-audit", "Privacy audit across ε", [_sweep_audit(sweep)]),
        _sweep_tables(sweep),
        _key_section(sweep),
    ]
    if sweep.representative is None:
        sections.append(Section("run", "Representative run",
                                [Note("No run of the sweep finished: no per-run sections.")]))
        return sections
    prefix = f"Run {sweep.representative_name}: "
    sections.append(Section("run", f"Representative run {sweep.representative_name}", [
        Note(f"The sections below describe run {sweep.representative_name} (preferred: ε = 1, "
             "seed 0" + (", the reference's value of every other grid key"
                         if _others(sweep) else "") + "; else the first finished run).")]))
    run_parts = run_sections(sweep.representative, prefix)
    for s in run_parts:
        s.id = f"run-{s.id}"
    return sections + run_parts


def _key_section(sweep: SweepData) -> Section:
    return Section("sweep-config", "Sweep configuration", [
        key_values("sweep_config", "Sweep configuration (sweep.json)", flatten(sweep.config))])
