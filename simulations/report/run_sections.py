"""The sections of a run's report: headline, learning, scores, tiers, contributions,
privacy ledger and audit, reproduction and reasons."""

from __future__ import annotations

import math
import shlex
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from clients.protocol.reasons import reason_text
from server.scoring import SCORE_MAX, SCORE_MIN, TIER_KEYS, TIERS
from simulations.report.blocks import (
    SERIES,
    TIER_COLOURS,
    Z95,
    Cards,
    Note,
    Plot,
    Section,
    Table,
    figure,
    finite_model_epsilon,
    flatten,
    fmt,
    key_values,
)
from simulations.report.load import Curves, RunData
from simulations.report.privacy_sections import audit_section, ledger_section

# ---- run sections ----------------------------------------------------------------------------


def headline_run(run: RunData) -> Section:
    m = run.metrics
    eps = finite_model_epsilon(m)
    audit = m.get("audit") or {}
    cards = Cards([
        ("test AUC", fmt(m.get("auc"))), ("KS", fmt(m.get("ks"))), ("Gini", fmt(m.get("gini"))),
        ("ε model (combined model)", fmt(eps) if eps is not None else "non-private"),
        ("oracle AUC", fmt(m.get("oracle_auc"))),
        ("audit ε lower bound (canaries)",
         fmt((audit.get("canary") or {}).get("epsilon_lower_bound"))),
    ])
    keys = ("auc", "ks", "gini", "brier", "log_loss", "oracle_auc", "baseline_central_auc",
            "baseline_central_dp_auc", "baseline_central_gbdt_auc",
            "baseline_central_scorecard_auc", "baseline_payments_only_auc")
    rows = [(k, m.get(k)) for k in keys]
    rows += [("epsilon_model", eps), ("epsilon_label", (m.get("epsilon") or {}).get("label")),
             ("delta", m.get("delta")),
             ("audit_canary_epsilon_lower", (audit.get("canary") or {}).get("epsilon_lower_bound")),
             ("audit_epsilon_lower", audit.get("epsilon_lower")),
             ("people_aligned", (m.get("people") or {}).get("aligned")),
             ("people_test", (m.get("people") or {}).get("test"))]
    headline = Table("headline", "Headline numbers (test split)",
                     pd.DataFrame(rows, columns=["metric", "value"]).astype({"value": object}))
    return Section("headline", "Headline numbers", [cards, headline, _comparison_table(m)])


def _comparison_table(m: dict) -> Table:
    cols = ("auc", "ks", "gini", "brier", "log_loss")
    rows = [{"model": SERIES["federated"][0], **{c: m.get(c) for c in cols}}]
    baselines = m.get("baselines") or {}
    order = ["central", "central_dp", "central_gbdt", "central_scorecard", "payments_only"]
    for key in sorted(baselines, key=lambda k: (order.index(k) if k in order else 99, k)):
        values = baselines[key]
        label = SERIES.get(key, (key, ""))[0]
        rows.append({"model": label, **{c: (values or {}).get(c) for c in cols}})
    if m.get("oracle_auc") is not None:
        rows.append({"model": SERIES["oracle"][0], "auc": m["oracle_auc"]})
    frame = pd.DataFrame(rows, columns=["model", *cols])
    return Table("model_comparison", "Federated model against the baselines (test split)", frame,
                 note="The oracle uses the generator's true default probabilities. Every "
                      "central model joins all parties' tables, which only the simulation can "
                      "do: a reference, not something a party could compute.")


def _learning_section(run: RunData) -> Section:
    section = Section("learning", "Learning curves")
    history = run.metrics.get("history") or {}
    rows = [{"model": model, "epoch": h.get("epoch"), "val_auc": h.get("val_auc"),
             "val_loss": h.get("val_loss"), "seconds": h.get("seconds")}
            for model, entries in history.items() for h in entries or []]
    if not rows:
        section.blocks.append(Note("Learning curves not available: metrics.json has no history."))
        return section
    data = pd.DataFrame(rows)
    fig, ax = figure()
    for model, part in data.groupby("model", sort=False):
        label, colour = SERIES.get(str(model), (str(model), None))
        ax.plot(part["epoch"], part["val_auc"], marker="o", label=label, color=colour)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)
    models = ", ".join(SERIES.get(str(k), (str(k), ""))[0] for k in data["model"].unique())
    section.blocks.append(Plot(
        "learning_curves", "Validation AUC by epoch", fig=fig, data=data,
        alt=f"Line chart of validation AUC against training epoch for {models}.",
    ))
    return section


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
        return run.curves.calibration, "Test split, from curves.json; 95 % intervals."
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
    return pd.DataFrame(rows), ("Test split: predictions from scores.parquet, observed rates "
                                "from metrics.json, Wilson 95 % intervals.")


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
    values = np.concatenate([pred, low, high])
    positive = values[values > 0]
    if positive.size == len(values):
        # Default rates span two orders of magnitude across tiers: log axes show all five.
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FormatStrFormatter("%g"))
    lo, hi = (positive.min() / 1.5, min(1.0, positive.max() * 1.5)) if positive.size else (0, 1)
    ax.plot([lo, hi], [lo, hi], color="#999999", linestyle="--", linewidth=1,
            label="perfect calibration")
    ax.set_xlabel("mean predicted default probability")
    ax.set_ylabel("observed default rate")
    ax.legend(frameon=False, fontsize="small")
    return Plot("calibration_by_tier", "Calibration by tier", fig=fig, data=data,
                note=note, alt="Scatter plot of observed default rate against mean predicted "
                               "probability for each tier, with 95 % confidence intervals and "
                               "the diagonal of perfect calibration.")


def _ks_plot(data: pd.DataFrame) -> Plot:
    fig, ax = figure()
    ax.plot(data["score"], data["cdf_bad"], label="defaulters", color="#c0392b")
    ax.plot(data["score"], data["cdf_good"], label="repayers", color="#27ae60")
    gap = (data["cdf_bad"] - data["cdf_good"]).abs()
    at = int(gap.to_numpy().argmax())
    s = float(data["score"].iloc[at])
    ax.vlines(s, data["cdf_good"].iloc[at], data["cdf_bad"].iloc[at], color="#333333",
              linestyle="--", label=f"KS = {gap.iloc[at]:.3f} at score {s:g}")
    ax.set_xlabel("score")
    ax.set_ylabel("cumulative share")
    ax.legend(frameon=False)
    return Plot("ks_curve", "KS curve: cumulative score distributions", fig=fig, data=data,
                alt=f"Cumulative distribution of scores for defaulters and repayers; the largest "
                    f"gap, KS {gap.iloc[at]:.3f}, is at score {s:g}.")


def _roc_plot(data: pd.DataFrame, auc: float | None) -> Plot:
    fig, ax = figure(4.8, 4.4)
    ax.plot(data["fpr"], data["tpr"], color=SERIES["federated"][1],
            label=f"federated (AUC {fmt(auc)})")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(frameon=False, loc="lower right")
    return Plot("roc_curve", "ROC curve (test split)", fig=fig, data=data,
                alt=f"ROC curve of the federated model, AUC {fmt(auc)}, above the chance line.")


def _scores_section(run: RunData) -> Section:
    section = Section("scores", "Scores: distribution, calibration, KS")
    hist, note = _histogram_data(run)
    section.blocks.append(_histogram_plot(hist, note) if hist is not None else
                          Note(f"Score histogram not available: {note}."))
    calib, note = _calibration_data(run)
    if calib is not None and not calib.empty:
        section.blocks.append(_calibration_plot(calib, note))
        section.blocks.append(Table("calibration", "Calibration by tier (test split)", calib,
                                    note=note, data_key="calibration_by_tier"))
    else:
        section.blocks.append(Note(f"Calibration by tier not available: {note}."))
    curves = run.curves or Curves()
    section.blocks.append(_ks_plot(curves.ks) if curves.ks is not None and len(curves.ks) else
                          Note(f"KS curve not available: {_curves_missing(run, 'ks')}."))
    section.blocks.append(_roc_plot(curves.roc, run.metrics.get("auc"))
                          if curves.roc is not None and len(curves.roc) else
                          Note(f"ROC curve not available: {_curves_missing(run, 'roc')}."))
    return section


def _curves_missing(run: RunData, part: str) -> str:
    if run.curves is None:
        if part in ("ks", "roc"):
            # Not recomputable here: these need the labels, which a run never publishes.
            return "the run has no curves.json (the curve needs labels the run does not publish)"
        return "the run has no curves.json"
    return f"curves.json has no {part!r}"


def _tiers_section(run: RunData) -> Section:
    counts = run.metrics.get("tiers") or {}
    rates = run.metrics.get("test_default_rate_by_tier") or {}
    total = sum(v for v in counts.values() if v) or None
    rows = [{"tier": tier.key, "name": tier.name_zh, "scores": f"{tier.low}–{tier.high}",
             "seed benefit": tier.benefit, "people": counts.get(tier.key),
             "share": (counts.get(tier.key) or 0) / total if total else None,
             "test default rate": rates.get(tier.key)} for tier in TIERS]
    table = Table("tiers", "Tiers, their seed benefits, and the people in each", pd.DataFrame(rows),
                  note="People: every scored person; default rate: test split.")
    return Section("tiers", "Tiers and seed benefits", [table])


def _contributions_section(run: RunData) -> Section:
    section = Section("contributions", "Per-silo contributions")
    data = run.curves.contributions if run.curves is not None else None
    if data is None or data.empty:
        section.blocks.append(Note("Per-silo contribution summary not available: "
                                   f"{_curves_missing(run, 'contributions')}."))
        return section
    fig, ax = figure(6.4, 0.6 + 0.55 * len(data))
    y = np.arange(len(data))
    ax.hlines(y, data["p10"], data["p90"], color="#1f4e79", linewidth=4, alpha=0.45,
              label="p10–p90")
    ax.plot(data["p50"], y, "o", color="#1f4e79", label="median")
    ax.plot(data["mean_abs_points"], y, "D", color="#e67e22", label="mean |points|")
    ax.axvline(0, color="#999999", linewidth=1)
    ax.set_yticks(y, data["silo"].astype(str))
    ax.set_xlabel("score points contributed")
    ax.legend(frameon=False, fontsize="small", loc="best")
    section.blocks.append(Plot(
        "contributions", "Score points contributed per silo", fig=fig, data=data,
        alt="Range chart of the score points each silo contributes: 10th to 90th percentile, "
            "median and mean absolute points per silo."))
    section.blocks.append(Table("contributions_table", "Score points contributed per silo", data,
                                data_key="contributions"))
    return section


def _repro_section(run: RunData) -> Section:
    man = run.manifest
    command = man.get("command")
    pairs: list[tuple[str, Any]] = [
        ("command", shlex.join(map(str, command)) if isinstance(command, list) else command),
        ("started_at", man.get("started_at")), ("git_commit", man.get("git_commit")),
        ("seed", man.get("seed")), ("population_seed", man.get("population_seed")),
        ("python", man.get("python")), ("platform", man.get("platform")),
    ]
    pairs += [(f"version {k}", v) for k, v in (man.get("versions") or {}).items()]
    return Section("reproducibility", "Reproducibility", [
        key_values("reproducibility", "Reproducibility: command, seeds, versions", pairs),
        key_values("config", "Resolved configuration (config.json)", flatten(run.config),
                    collapsed=True),
    ])


def _reasons_section(run: RunData) -> Section:
    section = Section("reasons", "Reason codes and eligibility")
    people = run.metrics.get("people", {})
    if people.get("ineligible") is not None:
        by = ", ".join(f"{k.replace(';', ' + ')} {v:,}" for k, v in
                       people.get("ineligible_by_reason", {}).items())
        section.blocks.append(Note(f"{people['ineligible']:,} of {people.get('aligned', 0):,} "
                                   f"people failed the opening conditions and got no score "
                                   f"({by})."))
    data = run.curves.reasons if run.curves is not None else None
    if data is None or data.empty:
        section.blocks.append(Note(f"Reason codes not available: {_curves_missing(run, 'reasons')}"
                                   " (runs with explain.reasons=0 or in concat mode have none)."))
        return section
    top = data.sort_values("first", ascending=False).head(12).reset_index(drop=True)
    scored = sum(run.metrics.get("tiers", {}).values()) or 1
    texts = [reason_text(*code.split(".", 1)) for code in top["reason"]]
    table = pd.DataFrame({
        "reason": top["reason"], "label": [t.label_en for t in texts],
        "label_zh": [t.label_zh for t in texts], "first_share": top["first"] / scored,
        "listed_share": top["listed"] / scored, "mean_points": top["mean_points"]})
    fig, ax = figure(6.4, 0.6 + 0.32 * len(table))
    y = np.arange(len(table))[::-1]
    ax.barh(y, table["first_share"], color="#1f4e79")
    ax.set_yticks(y, table["label"])
    ax.set_xlabel("share of scored people with it as their first reason")
    section.blocks.append(Plot(
        "reasons", "The most common first reason codes", fig=fig, data=table,
        alt="Bar chart of the share of scored people whose first reason code is each feature."))
    section.blocks.append(Table(
        "reasons_table", "Reason codes: how often first and listed, mean points lost", table,
        note="Points are lost against each silo's typical person; shares of scored people.",
        data_key="reasons"))
    return section


def run_sections(run: RunData, prefix: str = "") -> list[Section]:
    sections = [_learning_section(run), _scores_section(run), _tiers_section(run),
                _contributions_section(run), _reasons_section(run), ledger_section(run),
                audit_section(run), _repro_section(run)]
    regions = regions_section(run)
    if regions is not None:
        sections.insert(1, regions)
    if prefix:
        # In a sweep's report these tables and figures must say which run they describe.
        for s in sections:
            s.title = f"{prefix}{s.title}"
            for b in s.blocks:
                if isinstance(b, Table | Plot):
                    b.title = f"{prefix}{b.title}"
    return sections


def regions_section(run: RunData) -> Section | None:
    m = run.metrics
    regions = m.get("regions")
    if m.get("topology") != "horizontal" or not regions:
        return None
    frame = pd.DataFrame(regions)
    frame = frame.sort_values("median_spend_level").reset_index(drop=True)
    skew = m.get("region_skew")
    table = Table("regions", "Regions: who they hold and how the models do there", frame,
                  note="Test customers of each region. auc_global: the federated model; "
                       "auc_alone: the region's own model trained alone with the same budget.")
    fig, ax = figure(7.0, 3.6)
    x = np.arange(len(frame))
    ax.bar(x - 0.2, frame["auc_global"], 0.4, label="global (federated)",
           color=SERIES["federated"][1])
    ax.bar(x + 0.2, frame["auc_alone"], 0.4, label="region alone", color="#e67e22")
    low = float(np.nanmin(frame[["auc_global", "auc_alone"]].to_numpy()))
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(x, [f"{r}\n{d:.1%} default" for r, d in
                      zip(frame["region"], frame["default_rate"], strict=True)], fontsize=8)
    ax.set_ylabel("test AUC in the region")
    ax.set_xlabel("regions from poorest to richest (median spend level)")
    ax.legend(loc="lower right", fontsize=8)
    plot = Plot("regions_auc", "Test AUC per region: global model against the region alone",
                "Bar chart of each region's test AUC for the federated model and for the "
                "region's own model", fig, frame[["region", "default_rate",
                                                        "auc_global", "auc_alone"]],
                note=f"region_skew = {skew}: 0 deals customers to regions at random, 1 makes "
                     "the regions strata of spending and balances, so their default rates "
                     "differ most.")
    rates = frame["default_rate"]
    text = (f"{len(frame)} regions, default rates {rates.min():.1%} to {rates.max():.1%}; "
            f"the federated model beats the region alone in "
            f"{int((frame['auc_global'] > frame['auc_alone']).sum())} of {len(frame)} regions.")
    return Section("regions", "Regions (horizontal topology)", [Note(text), table, plot])


# ---- fedscore compare ----------------------------------------------------------------------------
