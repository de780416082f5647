"""The sections of a sweep's report: privacy-utility curve, audit against accounting,
the headline and the tables behind them."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from simulations.report.blocks import (
    SERIES,
    Z95,
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
from simulations.report.load import SweepData
from simulations.report.run_sections import ALL, SCORED, run_sections

# ---- sweep sections --------------------------------------------------------------------------


def summary_series(sweep: SweepData, name: str) -> pd.DataFrame | None:
    """(epsilon, mean, ci_low, ci_high) of one model's AUC across the sweep's budgets.

    Read from summary.csv; when it lacks that model's columns, computed from sweep.csv's done
    runs (normal 95 % interval)."""
    prefixes = ["auc"] if name == "auc" else [f"auc_{name}", name, f"{name}_auc"]
    s = sweep.summary
    for p in prefixes:
        cols = [f"{p}_mean", f"{p}_ci_low", f"{p}_ci_high"]
        if all(c in s.columns for c in cols):
            frame = s[["epsilon", *cols]].set_axis(["epsilon", "mean", "ci_low", "ci_high"],
                                                   axis=1)
            frame = frame.apply(pd.to_numeric, errors="coerce").dropna(subset=["mean"])
            return frame if len(frame) else None
    column = "auc" if name == "auc" else f"auc_{name}"
    done = sweep.runs[sweep.runs["status"].astype(str) == "done"]
    if column not in done.columns:
        return None
    values = pd.to_numeric(done[column], errors="coerce")
    grouped = values.groupby(done["epsilon"]).agg(["mean", "std", "count"]).dropna(
        subset=["mean"])
    if grouped.empty:
        return None
    half = Z95 * grouped["std"].fillna(0) / np.sqrt(grouped["count"])
    return pd.DataFrame({"epsilon": grouped.index, "mean": grouped["mean"],
                         "ci_low": grouped["mean"] - half, "ci_high": grouped["mean"] + half}
                        ).reset_index(drop=True)


# The privacy-utility curve's series: summary name -> (label, colour, population). The score's
# AUC is on the scored test people; the model's, its baselines' and the oracle's on all.
CURVES = {
    "auc": (f"{SERIES['federated'][0]}, {SCORED}", SERIES["federated"][1], SCORED),
    "all_test": (f"{SERIES['federated'][0]}, {ALL}", "#5dade2", ALL),
    "central_dp": (*SERIES["central_dp"], ALL),
    "best_silo": (*SERIES["best_silo"], ALL),
}
LINES = {name: (*SERIES[name], ALL) for name in ("central", "central_gbdt", "oracle")}


def _privacy_utility(sweep: SweepData) -> Plot | Note:
    series = {n: summary_series(sweep, n) for n in (*CURVES, *LINES)}
    if series["auc"] is None:
        return Note("Privacy–utility curve not available: no federated AUC in the sweep.")
    fig, ax = figure(7.2, 4.4)
    all_eps = np.concatenate([f["epsilon"].to_numpy() for f in series.values() if f is not None])
    to_x = eps_axis(ax, all_eps)
    for name, (label, colour, _) in CURVES.items():
        if series[name] is not None:
            _draw_curve(ax, series[name], to_x, label, colour)
    for name, (label, colour, _) in LINES.items():
        frame = series[name]
        if frame is not None:
            ax.axhline(float(frame["mean"].mean()), color=colour, linestyle="--", linewidth=1.3,
                       label=label)
    ax.set_ylabel("test AUC")
    # Outside the axes: inside, it would cover the non-private points at the right edge.
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    styles = {**CURVES, **LINES}
    rows = [frame.assign(series=styles[name][0], population=styles[name][2])
            for name, frame in series.items() if frame is not None]
    data = pd.concat(rows, ignore_index=True)[
        ["series", "population", "epsilon", "mean", "ci_low", "ci_high"]]
    absent = [styles[n][0] for n, f in series.items() if f is None]
    note = (f"Federated, {SCORED}: summary.csv auc (metrics.json auc), the people the score "
            f"serves; every other series on {ALL}, the ineligible included (the baselines and "
            "the oracle see no opening conditions). Bands and bars: 95 % confidence intervals "
            "over seeds; ∞ is the non-private run.")
    if absent:
        note += f" Not in this sweep: {', '.join(absent)}."
    return Plot("privacy_utility", "Privacy–utility: test AUC against ε", fig=fig,
                data=data, note=note,
                alt="Line chart of test AUC against the privacy budget epsilon on a log axis, "
                    "with 95 % confidence bands for the federated model and its baselines; the "
                    "non-private point sits at the right edge, labelled infinity.")


def _draw_curve(ax: Axes, frame: pd.DataFrame, to_x: Callable, label: str, colour: str) -> None:
    eps = frame["epsilon"].to_numpy(dtype=np.float64)
    finite = np.isfinite(eps)
    f = frame[finite]
    if len(f):
        ax.plot(f["epsilon"], f["mean"], marker="o", color=colour, label=label)
        ax.fill_between(f["epsilon"], f["ci_low"], f["ci_high"], color=colour, alpha=0.15)
    inf = frame[~finite]
    if len(inf):
        # The non-private point stands alone: joining it to the curve would invent a slope.
        mean, low, high = (float(inf[c].iloc[0]) for c in ("mean", "ci_low", "ci_high"))
        ax.errorbar(to_x(np.array([np.inf])), [mean], yerr=[[mean - low], [high - mean]],
                    fmt="s", color=colour, capsize=3, label=None if len(f) else label)


def _sweep_audit(sweep: SweepData) -> Plot | Note:
    done = sweep.runs[sweep.runs["status"].astype(str) == "done"]
    cols = [c for c in ("eps_model", "audit_epsilon_lower", "audit_attack_auc") if c in done]
    lower = pd.to_numeric(done.get("audit_epsilon_lower", pd.Series(dtype=float)),
                          errors="coerce")
    if lower.isna().all():
        return Note("Audit against ε not available: sweep.csv has no audit_epsilon_lower.")
    data = done[["epsilon", "seed", *cols]].copy()
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
    return Plot("sweep_audit", "Audit: empirical lower bound and accounted ε against target ε",
                fig=fig, data=data,
                note="One marker per run; non-private runs have no accounted ε.",
                alt="Scatter plot against the target epsilon (log axis, infinity at the right): "
                    "the accounted epsilon per run and the audit's empirical lower bound, with "
                    "the diagonal epsilon equals target.")


def _headline_sweep(sweep: SweepData) -> Section:
    runs = sweep.runs
    status = runs["status"].astype(str)
    auc = summary_series(sweep, "auc")
    done = int((status == "done").sum())
    items = [("runs done", f"{done} of {len(runs)}"),
             ("budgets ε", ", ".join(fmt_eps(e) for e in sorted(runs["epsilon"].unique()))),
             ("seeds", ", ".join(fmt(s) for s in sorted(runs["seed"].unique())))]
    cards = [("runs done", f"{done} / {len(runs)}")]
    for _, row in (auc if auc is not None else pd.DataFrame()).iterrows():
        items.append((f"federated AUC ({SCORED}) at ε = {fmt_eps(row['epsilon'])}",
                      fmt_interval(row["mean"], row["ci_low"], row["ci_high"])))
        # Cards only for the headline budgets: the default (1) and the non-private point.
        if row["epsilon"] in (1.0, math.inf):
            cards.append((f"AUC, {SCORED}, at ε = {fmt_eps(row['epsilon'])}", fmt(row["mean"])))
    frame = pd.DataFrame(items, columns=["quantity", "value"])
    return Section("headline", "Headline numbers", [
        Cards(cards),
        Table("sweep_headline", "Sweep at a glance (95 % intervals over seeds)", frame),
    ])


def _sweep_tables(sweep: SweepData) -> Section:
    failed = int((sweep.runs["status"].astype(str) != "done").sum())
    populations = (f"auc: {SCORED} (metrics.json auc); every other AUC column (all_test, the "
                   f"baselines', the oracle's): {ALL}.")
    return Section("sweep-tables", "Sweep table and summary", [
        Table("sweep_summary", "Summary per ε (mean and 95 % interval over seeds)",
              sweep.summary, note=populations),
        Table("sweep_runs", "Every run of the sweep", sweep.runs, collapsed=len(sweep.runs) > 20,
              note=populations + (f" {failed} run(s) failed and are left out of the figures."
                                  if failed else "")),
    ])


def sweep_sections(sweep: SweepData) -> list[Section]:
    sections = [
        _headline_sweep(sweep),
        Section("privacy-utility", "Privacy–utility curve", [_privacy_utility(sweep)]),
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
             "seed 0; else the first finished run).")]))
    run_parts = run_sections(sweep.representative, prefix)
    for s in run_parts:
        s.id = f"run-{s.id}"
    return sections + run_parts


def _key_section(sweep: SweepData) -> Section:
    return Section("sweep-config", "Sweep configuration", [
        key_values("sweep_config", "Sweep configuration (sweep.json)", flatten(sweep.config))])
