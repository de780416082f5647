"""The sections of a sweep's report: the privacy-utility curve (sweep_curves.py), the paired
differences against the reference grid point, the audit against accounting, the headline and the
tables behind them.

A sweep varies a grid of config keys (sweep.json "grid"; an old sweep only epsilon). Every
figure and table keeps its grid points apart: the curve has one series per value of the keys
other than its x-axis, and no number is a mean over different grid points."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from simulations.report.blocks import (
    ALL,
    SCORED,
    SERIES,
    Block,
    Cards,
    Note,
    Plot,
    Section,
    Table,
    eps_axis,
    figure,
    flatten,
    fmt,
    fmt_eps,
    fmt_interval,
    key_values,
)
from simulations.report.load import SweepData, same_value
from simulations.report.run_sections import run_sections
from simulations.report.sweep_curves import privacy_utility
from simulations.report.sweep_grid import (
    DIFF,
    DIFF_COLUMNS,
    interval_text,
    is_reference,
    other_keys,
    point_label,
    reference_text,
    summary_series,
    value_text,
)

# ---- paired differences ----------------------------------------------------------------------


def _paired_differences(sweep: SweepData) -> list[Block]:
    """summary.csv's paired differences in the federated AUC against the reference grid
    point: a table with the interval method, and a figure of each difference with its
    interval around zero."""
    summary = sweep.summary
    if not all(c in summary for c in DIFF):
        return [Note("Paired differences not available: summary.csv has no auc_diff_* "
                     "columns (a sweep written before paired differences existed).")]
    reference = reference_text(sweep) or "the reference grid point"
    rows = summary[~is_reference(summary)]
    cols = [*sweep.groups, *(c for c in ("n", *DIFF, "auc_diff_n") if c in summary)]
    frame = rows[cols].reset_index(drop=True)
    for c in DIFF:
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    if "auc_diff_n" in frame:
        # A count (float in summary.csv, where the reference row leaves it empty).
        pairs = pd.to_numeric(frame["auc_diff_n"], errors="coerce")
        if pairs.notna().all() and (pairs % 1 == 0).all():
            frame["auc_diff_n"] = pairs.astype(np.int64)
    method = interval_text(sweep)
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
    others = other_keys(sweep)
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
              for k in other_keys(sweep)]
    if "data_seed" in runs:
        paired = (pd.to_numeric(runs["data_seed"], errors="coerce") == runs["seed"]).all()
        items.append(("data seeds (population.seed)",
                      ", ".join(fmt(s) for s in _sorted_values(runs["data_seed"]))
                      + (" (each run's population seed is its training seed)" if paired
                         else "")))
    items.append(("training seeds" if "data_seed" in runs else "seeds",
                  ", ".join(fmt(s) for s in sorted(runs["seed"].unique()))))
    reference = reference_text(sweep) if any(c in sweep.summary for c in DIFF) else None
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
        Table("sweep_headline", f"Sweep at a glance ({interval_text(sweep)})", frame),
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
    for k in other_keys(sweep):
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
              summary, note=populations + (f" Intervals: {interval_text(sweep)}."
                                           if "interval" in sweep.summary else "")),
        Table("sweep_runs", "Every run of the sweep", runs, collapsed=len(runs) > 20,
              note=populations + (f" {failed} run(s) failed and are left out of the figures."
                                  if failed else "")),
    ])


def sweep_sections(sweep: SweepData) -> list[Section]:
    sections = [
        _headline_sweep(sweep),
        Section("privacy-utility", "Privacy–utility curve", [privacy_utility(sweep)]),
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
                         if other_keys(sweep) else "") + "; else the first finished run).")]))
    run_parts = run_sections(sweep.representative, prefix)
    for s in run_parts:
        s.id = f"run-{s.id}"
    return sections + run_parts


def _key_section(sweep: SweepData) -> Section:
    return Section("sweep-config", "Sweep configuration", [
        key_values("sweep_config", "Sweep configuration (sweep.json)", flatten(sweep.config))])
