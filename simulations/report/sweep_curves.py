"""The sweep report's privacy-utility figure: AUC against epsilon (or the first other grid key
when epsilon is fixed), one series per value of the other grid keys, never a mean over two
grid points; the baselines and the oracle as references."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from simulations.data.paths import EPSILON_KEY
from simulations.report.blocks import (
    ALL,
    SCORED,
    SERIES,
    Note,
    Plot,
    dodge,
    eps_axis,
    figure,
    fmt_eps,
)
from simulations.report.load import SweepData
from simulations.report.sweep_grid import (
    GRID_COLOURS,
    ORACLE_STYLES,
    REFERENCE_GID,
    interval_text,
    other_keys,
    point_label,
    summary_series,
    value_text,
    varies,
    x_key,
)

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
    return [k for k in other_keys(sweep) if k != x and varies(sweep.runs, k)]


def privacy_utility(sweep: SweepData) -> Plot | Note:
    series = {n: summary_series(sweep, n) for n in (*CURVES, *LINES)}
    fed = series["auc"]
    if fed is None:
        return Note("Privacy–utility curve not available: no federated AUC in the sweep.")
    x = x_key(sweep)
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
    fixed = [k for k in other_keys(sweep) if k != x and k not in by]
    note = (f"Federated, {SCORED}: summary.csv auc (metrics.json auc), the people the score "
            f"serves; every other series on {ALL}, the ineligible included (the baselines and "
            "the oracle see no opening conditions). "
            f"Bands and bars: {interval_text(sweep)}.")
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
