"""`fedscore compare`: runs of either topology side by side.

`build_comparison` reads several run or sweep directories (typically one
vertical and one horizontal, at the same budgets) and writes one report comparing AUC and the
gap to the oracle at equal epsilon. Topologies are compared on every test person
(`all_test_auc`): a horizontal run has no opening conditions, and the oracle sees none.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from server.privacy import model_epsilon
from simulations.report.blocks import (
    SERIES,
    TOPOLOGY_COLOURS,
    Note,
    Plot,
    ReportFiles,
    Section,
    Table,
    figure,
)
from simulations.report.load import ReportError, RunData, detect_kind, load_run, load_sweep
from simulations.report.render import write_report
from simulations.report.run_sections import ALL, SCORED


def _run_row(run: RunData, name: str) -> dict:
    m, cfg = run.metrics, run.config
    eps = m.get("epsilon") or {}
    spent = [v for v in [model_epsilon(m)] if v is not None]
    if eps.get("user") is not None:
        spent.append(eps["user"])
    target = cfg.get("privacy.epsilon")
    return {
        "source": name,
        "topology": m.get("topology", cfg.get("topology", "vertical")),
        "dp_level": m.get("dp_level", "sample" if spent else "off"),
        "region_skew": (cfg.get("population.region_skew")
                        if m.get("topology") == "horizontal" else None),
        "epsilon": float(target) if target is not None else math.inf,
        "epsilon_spent_max": max(spent) if spent else None,
        "auc": m.get("auc"),
        "all_test_auc": m.get("all_test_auc"),
        "oracle_auc": m.get("oracle_auc"),
        "central_auc": m.get("baseline_central_auc"),
        "central_gbdt_auc": m.get("baseline_central_gbdt_auc"),
        "central_scorecard_auc": m.get("baseline_central_scorecard_auc"),
        "gap_to_oracle": m.get("gap_to_oracle"),
        "seconds": (m.get("seconds") or {}).get("total"),
    }


def comparison_rows(directories: list[Path]) -> pd.DataFrame:
    rows = []
    for directory in directories:
        kind = detect_kind(directory)
        if kind == "run":
            rows.append(_run_row(load_run(directory), directory.name))
            continue
        sweep = load_sweep(directory)
        for run_name in sweep.runs.loc[sweep.runs["status"] == "done", "run"]:
            rows.append(_run_row(load_run(directory / "runs" / str(run_name)),
                                 f"{directory.name}/{run_name}"))
    if not rows:
        raise ReportError("no finished run in the directories given; pass run or sweep "
                          "directories with metrics.json")
    return pd.DataFrame(rows)


def _auc_by_epsilon(rows: pd.DataFrame) -> tuple[Plot, pd.DataFrame]:
    grouped = (rows.groupby(["topology", "dp_level", "epsilon"], dropna=False)
               .agg(all_test_auc=("all_test_auc", "mean"), oracle_auc=("oracle_auc", "mean"),
                    runs=("all_test_auc", "size"))
               .reset_index())
    fig, ax = figure()
    finite = grouped["epsilon"].replace(math.inf, np.nan)
    top = (finite.max() if finite.notna().any() else 1.0) * 2
    shown = grouped.assign(x=grouped["epsilon"].replace(math.inf, top))
    markers = {"sample": "o", "user": "s", "off": "D"}
    for (topology, level), part in shown.groupby(["topology", "dp_level"], dropna=False):
        part = part.sort_values("x")
        ax.plot(part["x"], part["all_test_auc"], marker=markers.get(str(level), "o"),
                label=f"{topology}, {'non-private' if level == 'off' else f'{level}-level DP'}",
                color=TOPOLOGY_COLOURS.get(str(topology)),
                linestyle="--" if level == "user" else "-")
    oracle = grouped["oracle_auc"].mean()
    if pd.notna(oracle):
        ax.axhline(oracle, color=SERIES["oracle"][1], linestyle=":", label="oracle")
    ax.set_xscale("log")
    ticks = sorted(set(shown["x"]))
    ax.set_xticks(ticks, [("off" if t == top else f"{t:g}") for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ε per party (off: non-private)")
    ax.set_ylabel(f"test AUC, {ALL}")
    ax.legend(fontsize=8)
    plot = Plot("topologies_auc", f"Test AUC against ε, by topology ({ALL})",
                f"Line chart of test AUC on {ALL} against the privacy budget for each topology",
                fig, grouped,
                note=f"Mean over the runs at each budget of all_test_auc, on {ALL} as the "
                     "oracle. Sample-level ε protects one customer; user-level ε protects a "
                     "whole region's data.")
    return plot, grouped


def build_comparison(directories: list[Path], out: Path) -> ReportFiles:
    """Compare runs and sweeps (of either topology) at equal epsilon; writes into `out`."""
    rows = comparison_rows([Path(d) for d in directories])
    out.mkdir(parents=True, exist_ok=True)
    plot, grouped = _auc_by_epsilon(rows)
    # One column per topology and DP level: user-level and sample-level epsilons mean
    # different things and are never averaged together.
    labelled = grouped.assign(model=grouped["topology"].astype(str) + ", "
                              + grouped["dp_level"].astype(str))
    pairs = labelled.pivot_table(index="epsilon", columns="model", values="all_test_auc")
    pairs.columns.name = None
    sections = [
        Section("topologies", "Topologies at equal ε", [
            Note("Vertical: three silos hold different facts about the same people. Horizontal: "
                 "regions hold all facts about different people. Same generator, model family, "
                 "score scale and accountant."),
            plot,
            Table("topologies_by_epsilon", f"Test AUC by topology at each ε ({ALL})",
                  pairs.reset_index()),
        ]),
        Section("runs", "Every run compared", [
            Table("compared_runs", "Runs compared", rows, collapsed=len(rows) > 12,
                  note=f"auc: {SCORED} (metrics.json auc); all_test_auc, the oracle, the "
                       f"central references and gap_to_oracle: {ALL}.")]),
    ]
    return write_report(out.resolve(), "comparison", "fedscore report: topologies compared",
                        sections)
