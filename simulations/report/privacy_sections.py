"""The privacy sections of a run's report: the ledger (what each party spent, step by step)
and the empirical audits held against the accounted epsilon."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from simulations.report.blocks import (
    Note,
    Plot,
    Section,
    Table,
    figure,
    finite,
    finite_model_epsilon,
    fmt,
)
from simulations.report.load import RunData


def _reported_epsilon(metrics: dict, party: str, budget: str) -> Any:
    eps = metrics.get("epsilon") or {}
    value = eps.get(budget)
    return value.get(party) if isinstance(value, dict) else value


def _ledger_final(run: RunData, spent: list[dict]) -> pd.DataFrame:
    rows = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in spent:
        groups.setdefault((str(e["party"]), str(e["budget"])), []).append(e)
    for (party, budget), lines in groups.items():
        rows.append({"party": party, "budget": budget, "accountant": lines[-1].get("accountant"),
                     "rounds": len({e.get("round") for e in lines}),
                     "steps": sum(int(e.get("steps") or 0) for e in lines),
                     "epsilon": lines[-1]["epsilon"], "delta": lines[-1].get("delta"),
                     "metrics_epsilon": _reported_epsilon(run.metrics, party, budget)})
    return pd.DataFrame(rows)


def _ledger_compact(entries: list[dict]) -> pd.DataFrame:
    """Ledger lines with the parties of one round and budget merged when they spent alike."""
    keys = ("round", "budget", "mechanism", "event", "steps", "noise_multiplier", "sample_rate",
            "epsilon", "delta")
    rows: list[dict] = []
    for e in entries:
        row = {k: e.get(k) for k in keys}
        row["event"] = row["event"] or "spent"
        if rows and all(rows[-1][k] == row[k] for k in keys):
            rows[-1]["parties"] += f", {e['party']}"
        else:
            rows.append({**row, "parties": str(e["party"])})
    return pd.DataFrame(rows, columns=["round", "parties", *keys[1:]])


def _ledger_plot(spent: list[dict], target: float | None) -> Plot:
    data = pd.DataFrame([{"party": e["party"], "budget": e["budget"], "round": e.get("round"),
                          "epsilon": e["epsilon"]} for e in spent])
    fig, ax = figure()
    styles = ["-", "--", "-.", ":"]
    for i, ((party, budget), part) in enumerate(data.groupby(["party", "budget"], sort=False)):
        # Parties usually spend identically; distinct dashes keep overlapping lines visible.
        ax.step(part["round"], part["epsilon"], where="post", linestyle=styles[i % len(styles)],
                label=f"{party} ({budget})")
    if target is not None:
        ax.axhline(target, color="#c0392b", linewidth=1, alpha=0.7, label=f"target ε = {target:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε")
    ax.legend(frameon=False, fontsize="small", ncol=2)
    return Plot("ledger_cumulative", "Cumulative ε by round, per party and budget", fig=fig,
                data=data, alt="Step chart of each party's cumulative privacy loss epsilon "
                               "against the training round, with the target budget as a line.")


def _privacy_parameters(run: RunData) -> Table:
    m = run.metrics
    keys = ("accountant", "delta", "delta_accountant", "delta_thresholds", "noise_multiplier",
            "sample_rate", "max_grad_norm", "training_steps", "stopped_by_budget_cap")
    rows = [("target epsilon (config)", run.config.get("privacy.epsilon")),
            ("label epsilon (config)", run.config.get("privacy.label_epsilon"))]
    for k in keys:
        if k.startswith("delta_") and k not in m:
            continue  # how delta splits: vertical runs since the thresholds' reservation
        value = m.get(k)
        # Per party (a horizontal run's regions): one row each, never a JSON object.
        rows += ([(f"{k} ({party})", v) for party, v in sorted(value.items())]
                 if isinstance(value, dict) else [(k, value)])
    frame = pd.DataFrame(rows, columns=["parameter", "value"]).astype({"value": object})
    return Table("privacy_parameters", "Privacy parameters", frame)


def ledger_section(run: RunData) -> Section:
    section = Section("ledger", "Privacy ledger", [_privacy_parameters(run)])
    if not run.ledger:
        section.blocks.append(Note("Privacy ledger not available: the run has no ledger.jsonl "
                                   "(runs without differential privacy write none)."))
        return section
    # A refused line carries the epsilon the refused steps would have reached, not a spend.
    spent = [e for e in run.ledger if e.get("event") != "refused" and e.get("party") != "*"]
    if spent:
        section.blocks.append(Table(
            "ledger_final", "Final ε per party and budget", _ledger_final(run, spent),
            note="epsilon: the ledger's last line; metrics_epsilon: what metrics.json reports."))
        section.blocks.append(_ledger_plot(spent, finite(run.config.get("privacy.epsilon"))))
    compact = _ledger_compact(run.ledger)
    section.blocks.append(Table(
        "ledger_lines", f"Ledger lines ({len(run.ledger)} lines, {len(compact)} rows)", compact,
        note="Parties that spent alike in a round share one row; 'refused' rows carry the ε the "
             "refused steps would have reached.", collapsed=len(compact) > 12))
    return section


def audit_section(run: RunData) -> Section:
    section = Section("audit", "Privacy audit")
    audit = run.metrics.get("audit")
    if not audit:
        section.blocks.append(Note("Privacy audit not available: metrics.json has no 'audit'."))
        return section
    accounted = finite_model_epsilon(run.metrics)
    canary = audit.get("canary")
    lower = None
    if canary:
        keys: tuple[str, ...] = ("epsilon_lower_bound", "confidence", "canaries", "guesses",
                                 "correct", "blocks", "noise_multiplier", "sample_rate", "steps",
                                 "seconds")
        rows = [("accounted epsilon (combined model)", accounted)]
        rows += [(k, canary.get(k)) for k in keys]
        frame = pd.DataFrame(rows, columns=["quantity", "value"]).astype({"value": object})
        lower = finite(canary.get("epsilon_lower_bound"))
        # DP tree and DP scorecard runs audit their own releases (tree_audit.py).
        what = "the model's own releases" if "not_audited" in canary else "the joint DP-SGD"
        audited = f" Audited: {canary['audited']}." if canary.get("audited") else ""
        section.blocks.append(Table(
            "audit_canary", f"One-run canary audit of {what}", frame,
            note=f"{canary.get('method', 'one-run canary audit')}.{audited} Result: "
                 f"{_verdict(lower, accounted)}."))
    # The membership attack sits at the top of `audit`, in every run directory.
    keys = ("epsilon_lower", "attack_auc", "threshold", "tpr", "fpr", "n_members",
            "n_nonmembers", "confidence", "delta")
    rows = [(k, audit.get(k)) for k in keys]
    frame = pd.DataFrame(rows, columns=["quantity", "value"]).astype({"value": object})
    weak = finite(audit.get("epsilon_lower"))
    section.blocks.append(Table("audit", "Loss-threshold membership attack on released scores",
                                frame, note=f"Result: {_verdict(weak, accounted)}. A weaker "
                                "attack than the canary audit: a black-box view of the scores."))
    section.blocks.append(_audit_bar(accounted, lower if lower is not None else weak))
    return section


def _verdict(lower: float | None, accounted: float | None) -> str:
    if lower is None or accounted is None or lower <= accounted:
        return "consistent with the accountant (lower bound ≤ accounted ε)"
    return "the empirical lower bound EXCEEDS the accounted ε: check the accounting"


def _audit_bar(accounted: float | None, lower: float | None) -> Plot:
    labels = ["accounted ε", "empirical ε lower bound"]
    values = [accounted if accounted is not None else np.nan, lower if lower is not None else 0]
    data = pd.DataFrame({"quantity": ["accounted_epsilon", "empirical_epsilon_lower"],
                         "epsilon": values})
    fig, ax = figure(6.0, 2.0)
    ax.barh(labels, np.nan_to_num(values), color=["#1f4e79", "#e67e22"])
    for y, v in enumerate(values):
        ax.text(np.nan_to_num(v), y, f" {fmt(v) if not np.isnan(v) else 'non-private'}",
                va="center")
    ax.invert_yaxis()  # accounted first, read top-down like the table
    ax.set_xlabel("ε")
    ax.margins(x=0.2)
    return Plot("audit_bounds", "Empirical lower bound against accounted ε", fig=fig,
                data=data, alt=f"Bar chart: accounted epsilon {fmt(accounted)} and the audit's "
                               f"empirical lower bound {fmt(lower)}.")
