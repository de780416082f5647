"""The sections of a run's report: headline, learning, tiers, contributions, reproduction,
reasons and regions; with the scores section (score_sections.py) and the privacy ledger and
audit (privacy_sections.py), `run_sections` lists them in order."""

from __future__ import annotations

import shlex
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from clients.protocol.reasons import reason_text
from server.metrics import ALL_TEST, FIGURES
from server.scoring import TIERS
from simulations.report.blocks import (
    ALL,
    SCORED,
    SERIES,
    Cards,
    Note,
    Plot,
    Section,
    Table,
    figure,
    finite,
    finite_model_epsilon,
    flatten,
    fmt,
    key_values,
)
from simulations.report.load import RunData
from simulations.report.privacy_sections import audit_section, ledger_section
from simulations.report.score_sections import curves_missing, scores_section

# ---- run sections ----------------------------------------------------------------------------

REFERENCE_KEYS = ("oracle_auc", "baseline_central_auc", "baseline_central_dp_auc",
                  "baseline_central_gbdt_auc", "baseline_central_scorecard_auc",
                  "baseline_payments_only_auc")


def is_horizontal(run: RunData) -> bool:
    return run.metrics.get("topology") == "horizontal"


def headline_run(run: RunData) -> Section:
    m = run.metrics
    eps = finite_model_epsilon(m)
    audit = m.get("audit") or {}
    cards = [(f"AUC, {SCORED}", fmt(m.get("auc"))), (f"KS, {SCORED}", fmt(m.get("ks")))]
    if m.get(ALL_TEST + "auc") != m.get("auc"):
        cards.append((f"AUC, {ALL}", fmt(m.get(ALL_TEST + "auc"))))
    cards += [
        _epsilon_card(m),
        (f"oracle AUC, {ALL}", fmt(m.get("oracle_auc"))),
        ("audit ε lower bound (canaries)",
         fmt((audit.get("canary") or {}).get("epsilon_lower_bound"))),
    ]
    rows = [(k, SCORED, m.get(k)) for k in FIGURES]
    rows += [(ALL_TEST + k, ALL, m.get(ALL_TEST + k)) for k in FIGURES]
    # A topology's own references (the payments silo: vertical only) where the run has them.
    rows += [(k, ALL, m.get(k)) for k in REFERENCE_KEYS if k in m]
    people = m.get("people") or {}
    rows += [("epsilon_model", "", eps),
             ("epsilon_label", "", (m.get("epsilon") or {}).get("label")),
             ("delta", "", m.get("delta")),
             ("audit_canary_epsilon_lower", "",
              (audit.get("canary") or {}).get("epsilon_lower_bound")),
             ("audit_epsilon_lower", "", audit.get("epsilon_lower")),
             ("people_aligned", "", people.get("aligned")),
             ("people_test", ALL, people.get("test")),
             ("people_test_scored", SCORED, people.get("test_scored"))]
    frame = pd.DataFrame(rows, columns=["metric", "population", "value"]).astype(
        {"value": object})
    headline = Table("headline", "Headline numbers (test split)", frame,
                     note=_population_note(run))
    blocks: list[Table | Plot | Note | Cards] = [Cards(cards), headline, _comparison_table(run)]
    if m.get("model_kind") == "gbdt":
        blocks.insert(0, Note(_trees_note(m)))
    if m.get("model_kind") == "scorecard":
        blocks.insert(0, Note(_scorecard_note(m)))
    return Section("headline", "Headline numbers", blocks)


def _scorecard_note(m: dict) -> str:
    """What a model.kind=scorecard run is (server/scorecard_run.py)."""
    c = m.get("scorecard") or {}
    return (f"Model: vertical WoE scorecard ({c.get('bins')} monotone bins over "
            f"{c.get('inputs_used')} of {c.get('inputs')} inputs with a nonzero coefficient, "
            f"{c.get('steps')} regression steps; each silo's points table: "
            f"{c.get('tables', 'not recorded')}). "
            f"{_first_upper(str(c.get('model_note', '')))}. Labels against the silos: "
            f"{c.get('label_protection', 'not recorded')}.")


def _trees_note(m: dict) -> str:
    """What a model.kind=gbdt run is, and what it does not claim (server/gbdt_run.py)."""
    g = m.get("gbdt") or {}
    how = g.get("mode") or f"protection {g.get('protection')}"  # DP trees: their mode
    return (f"Model: vertical gradient-boosted trees ({g.get('trees')} trees of depth "
            f"{g.get('depth')} over {g.get('bins')} bins, {how}). "
            f"{_first_upper(str(g.get('model_note', '')))}. Labels against the silos: "
            f"{g.get('label_protection', 'not recorded')}.")


def _first_upper(text: str) -> str:
    """str.capitalize() lowercases the rest: "DP" would read "dp"."""
    return text[:1].upper() + text[1:]


def _population_note(run: RunData) -> str:
    if is_horizontal(run):
        return (f"Every customer of a horizontal run is scored: {SCORED} and {ALL} are the "
                "same people.")
    return (f"Population: {SCORED}, the eligible people the score serves (metrics.json auc, "
            f"ks ...); {ALL}, the ineligible included (all_test_*, the oracle and the "
            "baselines, which see no opening conditions).")


def _epsilon_card(m: dict) -> tuple[str, str]:
    """The headline budget: the combined model's (vertical), the largest region's
    (horizontal, sample-level DP) or the one user-level budget of all regions."""
    eps = finite_model_epsilon(m)
    user = finite((m.get("epsilon") or {}).get("user"))
    if m.get("topology") != "horizontal":
        return "ε model (combined model)", fmt(eps) if eps is not None else "non-private"
    if user is not None:
        return "ε user-level (one region's data)", fmt(user)
    return "ε per region (largest)", fmt(eps) if eps is not None else "non-private"


def _comparison_table(run: RunData) -> Table:
    m, cols = run.metrics, FIGURES
    rows = [{"model": SERIES["federated"][0], **{c: m.get(ALL_TEST + c) for c in cols}}]
    baselines = m.get("baselines") or {}
    order = ["central", "central_dp", "central_gbdt", "central_scorecard", "payments_only"]
    for key in sorted(baselines, key=lambda k: (order.index(k) if k in order else 99, k)):
        values = baselines[key]
        label = SERIES.get(key, (key, ""))[0]
        rows.append({"model": label, **{c: (values or {}).get(c) for c in cols}})
    if m.get("oracle_auc") is not None:
        rows.append({"model": SERIES["oracle"][0], "auc": m["oracle_auc"]})
    frame = pd.DataFrame(rows, columns=["model", *cols])
    return Table("model_comparison", f"Federated model against the baselines ({ALL})", frame,
                 note=("" if is_horizontal(run) else
                       f"Every row on {ALL}, the ineligible included: the baselines and the "
                       "oracle see no opening conditions, so the federated row is metrics.json's "
                       f"all_test_*; the score's own figures ({SCORED}) are in the headline. ")
                      + "The oracle uses the generator's true default probabilities. Every "
                      "central model joins all parties' tables, which only the simulation can "
                      "do: a reference, not something a party could compute.")


def _learning_section(run: RunData) -> Section:
    section = Section("learning", "Learning curves")
    history = run.metrics.get("history") or {}
    # A horizontal run's history is per round (each of several local epochs).
    step = "round" if is_horizontal(run) else "epoch"
    rows = [{"model": model, step: h.get(step), "val_auc": h.get("val_auc"),
             "val_loss": h.get("val_loss"), "seconds": h.get("seconds")}
            for model, entries in history.items() for h in entries or []]
    if not rows:
        section.blocks.append(Note("Learning curves not available: metrics.json has no history."))
        return section
    data = pd.DataFrame(rows)
    fig, ax = figure()
    for model, part in data.groupby("model", sort=False):
        label, colour = SERIES.get(str(model), (str(model), None))
        ax.plot(part[step], part["val_auc"], marker="o", label=label, color=colour)
    ax.set_xlabel(step)
    ax.set_ylabel("validation AUC")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)
    models = ", ".join(SERIES.get(str(k), (str(k), ""))[0] for k in data["model"].unique())
    section.blocks.append(Plot(
        "learning_curves", f"Validation AUC by {step} (all validation people)", fig=fig,
        data=data, alt=f"Line chart of validation AUC against training {step} for {models}.",
    ))
    return section



def _tiers_section(run: RunData) -> Section:
    counts = run.metrics.get("tiers") or {}
    rates = run.metrics.get("test_default_rate_by_tier") or {}
    total = sum(v for v in counts.values() if v) or None
    rows = [{"tier": tier.key, "name": tier.name_zh, "scores": f"{tier.low}–{tier.high}",
             "seed benefit": tier.benefit, "people": counts.get(tier.key),
             "share": (counts.get(tier.key) or 0) / total if total else None,
             "test default rate": rates.get(tier.key)} for tier in TIERS]
    table = Table("tiers", "Tiers, their seed benefits, and the people in each", pd.DataFrame(rows),
                  note=f"People: every scored person; default rate: {SCORED}.")
    return Section("tiers", "Tiers and seed benefits", [table])


def _contributions_section(run: RunData) -> Section:
    section = Section("contributions", "Per-silo contributions")
    data = run.curves.contributions if run.curves is not None else None
    if data is None or data.empty:
        section.blocks.append(Note("Per-silo contribution summary not available: "
                                   f"{curves_missing(run, 'contributions')}."))
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
    if run.metrics.get("model_kind") == "gbdt":
        section.blocks.append(Note(
            "Trees have no additive per-silo model: along each person's path in every tree, "
            "the change of node value at a split is credited to the silo that owns the split "
            "(the node values are the trees' leaf weights at every node), so a common "
            "constant and the silos' points add up to each score; other attributions would "
            "differ."))
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
    eligibility = _eligibility_text(run.metrics.get("people", {}))
    if eligibility:
        section.blocks.append(Note(eligibility))
    data = run.curves.reasons if run.curves is not None else None
    if (data is None or data.empty) and run.metrics.get("model_kind") == "gbdt":
        section.blocks.append(Note("Reason codes per person are not built for model.kind=gbdt "
                                   "yet (a later session); the per-silo points above are the "
                                   "trees' only explanation in this run."))
        return section
    if data is None or data.empty:
        section.blocks.append(Note(f"Reason codes not available: {curves_missing(run, 'reasons')}"
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


def _eligibility_text(people: dict) -> str | None:
    """Who got no score and why; None for a run that does not say (older runs)."""
    ineligible = people.get("ineligible")
    if ineligible is None:
        return None
    if not ineligible:
        return "Every aligned person met the opening conditions and got a score."
    by = ", ".join(f"{k.replace(';', ' + ')} {v:,}"
                   for k, v in (people.get("ineligible_by_reason") or {}).items())
    return (f"{ineligible:,} of {people.get('aligned', 0):,} people failed the opening "
            f"conditions and got no score" + (f" ({by})." if by else "."))


def run_sections(run: RunData, prefix: str = "") -> list[Section]:
    # Silo contributions, reason codes and the opening conditions exist in the vertical
    # topology only: a horizontal run's report has no such sections.
    vertical = [] if is_horizontal(run) else [_contributions_section(run),
                                             _reasons_section(run)]
    sections = [_learning_section(run), scores_section(run), _tiers_section(run), *vertical,
                ledger_section(run), audit_section(run), _repro_section(run)]
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
