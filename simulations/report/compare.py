"""`fedscore compare`: runs and sweeps side by side, one series per configuration.

`build_comparison` reads several run or sweep directories (typically one vertical and one
horizontal, at the same budgets) and writes one report comparing AUC and the gap to the oracle
at equal epsilon.

- Series. Runs are averaged together only when their configurations (config.json) are equal
  apart from the keys a comparison spans: `privacy.epsilon` (the x axis), `seed` and
  `population.seed` (replicates); settings that change no result are left out too
  (`IGNORED`: where files live, how a refusal is reported, process counts, timeouts,
  retries). Runs that differ in anything else are separate series, never pooled: an 8-epoch
  run stays apart from 4-epoch sweep cells, a grid sweep's cells at two `train.lr` are two
  series. A series is named by its topology and DP level and, where several share those, by
  the settings in which they differ ("vertical, sample-level DP, train.epochs=8");
  compared_series lists every setting that differs between any two series.
- Intervals: per series and epsilon, the mean with a 95 % Student t interval over the
  replicates (simulations/report/stats.py); none for a single run.
- Each series has its own oracle and gap to it (topologies and populations have their own
  oracles and test sets), and its own delta: series at different deltas have epsilons that
  are not comparable as such, and a note says so.
- Time: `train_seconds`, the federated training phase alone (metrics.json `seconds.train`),
  which a single run and a sweep cell measure alike. `seconds.total` is not comparable: a
  sweep's cells share one engine start and one PSI, a single run pays for its own.

Topologies are compared on every test person (`all_test_auc`): a horizontal run has no
opening conditions, and the oracle sees none.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from server.privacy import model_epsilon
from server.run_keys import NOT_COMPUTED_KEYS, NOT_COMPUTED_PREFIXES
from simulations.report.blocks import (
    ALL,
    SCORED,
    SERIES,
    TOPOLOGY_COLOURS,
    Note,
    Plot,
    ReportFiles,
    Section,
    Table,
    dodge,
    eps_axis,
    figure,
    fmt,
    fmt_eps,
)
from simulations.report.load import ReportError, RunData, detect_kind, load_run, load_sweep
from simulations.report.render import FIGURE_FORMATS, write_report
from simulations.report.stats import LEVEL, interval_method, mean_ci, replicates

# What a comparison spans: the x axis and the replicates averaged at each point.
SPANNED_KEYS = frozenset({"privacy.epsilon", "seed", "population.seed"})
# Settings that are part of a run's key (server.run_keys.derive_run_key: leaving them out
# now would change every run's secret draws) but not of what it learns: the number of PSI
# processes (the same intersection), how long to wait for a party and how often to ask again.
OPERATIONAL_KEYS = frozenset({"psi.workers", "join_timeout", "reply_timeout", "retries"})
IGNORED = SPANNED_KEYS | OPERATIONAL_KEYS | NOT_COMPUTED_KEYS
# Series beyond the first of each topology (whose colour TOPOLOGY_COLOURS gives).
EXTRA_COLOURS = ("#c0392b", "#16a085", "#e67e22", "#7f8c8d", "#d4ac0d", "#2471a3", "#6e2c00")
# A key a run's config.json lacks (an older run): a value of its own, never the default.
ABSENT = "\0absent"
DP_MARKERS = {"sample": "o", "user": "s", "off": "D"}
# Deltas move a little with the number of training people from one population to the next;
# a 1 % change of delta moves epsilon by far less than its interval.
DELTA_TOLERANCE = 0.01
TIME_NOTE = ("train_seconds: the federated training phase alone (metrics.json seconds.train), "
             "measured alike in a single run and in a sweep cell; a run's total time is not "
             "comparable with a cell's, whose sweep starts the engine and runs PSI once for "
             "several cells")


def ignored(key: str) -> bool:
    """A config key that does not separate series."""
    return key in IGNORED or key.startswith(NOT_COMPUTED_PREFIXES)


def series_settings(config: dict) -> dict:
    """The part of a run's flat configuration that its series shares."""
    return {k: v for k, v in config.items() if not ignored(k)}


# ---- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Compared:
    """One finished run: its row of compared_runs and the settings that name its series."""

    row: dict
    settings: dict


def _run_row(run: RunData, name: str) -> dict:
    m, cfg = run.metrics, run.config
    eps = m.get("epsilon") or {}
    spent = [v for v in [model_epsilon(m)] if v is not None]
    if eps.get("user") is not None:
        spent.append(eps["user"])
    target = cfg.get("privacy.epsilon")
    level = m.get("dp_level", "sample" if spent else "off")
    all_test, oracle = m.get("all_test_auc"), m.get("oracle_auc")
    gap = m.get("gap_to_oracle")
    if gap is None and all_test is not None and oracle is not None:
        gap = oracle - all_test
    return {
        "source": name,
        "topology": m.get("topology", cfg.get("topology", "vertical")),
        "dp_level": level,
        "region_skew": (cfg.get("population.region_skew")
                        if m.get("topology") == "horizontal" else None),
        "epsilon": float(target) if target is not None else math.inf,
        "seed": cfg.get("seed"),
        "data_seed": cfg.get("population.seed"),
        "epsilon_spent_max": max(spent) if spent else None,
        # A non-private run spends no epsilon, so it has no delta to be read with one.
        "delta": m.get("delta") if level != "off" else None,
        "auc": m.get("auc"),
        "all_test_auc": all_test,
        "oracle_auc": oracle,
        "central_auc": m.get("baseline_central_auc"),
        "central_gbdt_auc": m.get("baseline_central_gbdt_auc"),
        "central_scorecard_auc": m.get("baseline_central_scorecard_auc"),
        "gap_to_oracle": gap,
        "train_seconds": (m.get("seconds") or {}).get("train"),
    }


def _compared(run: RunData, name: str) -> Compared:
    return Compared(row=_run_row(run, name), settings=series_settings(run.config))


def read_compared(directories: list[Path]) -> list[Compared]:
    """Every finished run of the directories given (a run, or a sweep's done cells)."""
    found = []
    for directory in directories:
        if detect_kind(directory) == "run":
            found.append(_compared(load_run(directory), directory.name))
            continue
        sweep = load_sweep(directory)
        for run_name in sweep.runs.loc[sweep.runs["status"] == "done", "run"]:
            # Cells live in DIR/runs/<name> (simulations/run/sweep.py); DIR/<name> is read too.
            cell = directory / "runs" / str(run_name)
            found.append(_compared(load_run(cell if cell.is_dir() else directory / str(run_name)),
                                   f"{directory.name}/{run_name}"))
    if not found:
        raise ReportError("no finished run in the directories given; pass run or sweep "
                          "directories with metrics.json")
    return found


# ---- series ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Series:
    label: str
    topology: str
    dp: str  # "sample-level DP", "user-level DP" or "non-private"
    settings: dict  # the configuration its runs share (spanned and ignored keys left out)
    colour: str


def _canonical(value: Any) -> Any:
    """A setting as compared: 8 and 8.0 are one value, as are [32, 16] and (32, 16)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return str(value)


def _identity(settings: dict) -> str:
    return json.dumps(_canonical(settings), sort_keys=True)


def setting_text(value: Any) -> str:
    """A setting as a label shows it: 8, 0.01, inf, [32,16], fedprox, true (null: set to
    nothing; unset: the run's config.json does not have the key)."""
    if isinstance(value, str) and value == ABSENT:
        return "unset"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, list | tuple):
        return "[" + ",".join(setting_text(v) for v in value) + "]"
    return str(value)


def differing_keys(settings: Iterable[dict]) -> list[str]:
    """The keys whose value is not the same in every one of `settings` (absent counts as a
    value of its own: an older run without a setting is not assumed to have its default)."""
    settings = list(settings)
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys
            if len({json.dumps(_canonical(s.get(k, ABSENT)), sort_keys=True)
                    for s in settings}) > 1]


def _dp_text(levels: Iterable[str]) -> str:
    private = sorted({str(level) for level in levels if level != "off"})
    return " and ".join(f"{level}-level DP" for level in private) or "non-private"


def find_series(found: list[Compared]) -> tuple[list[Series], list[int]]:
    """The series of the runs, in the order first met, and each run's series index."""
    identities: dict[str, int] = {}
    index = [identities.setdefault(_identity(c.settings), len(identities)) for c in found]
    members: list[list[Compared]] = [[] for _ in identities]
    for i, c in zip(index, found, strict=True):
        members[i].append(c)
    bases = [(str(m[0].row["topology"]), _dp_text(c.row["dp_level"] for c in m))
             for m in members]
    labels = []
    for i, base in enumerate(bases):
        # Named by what tells it apart from the series it could be mistaken for: those of
        # the same topology and DP level.
        alike = [members[j][0].settings for j, b in enumerate(bases) if b == base]
        parts = [f"{k}={setting_text(members[i][0].settings.get(k, ABSENT))}"
                 for k in differing_keys(alike)]
        labels.append(", ".join([*base, *parts]))
    colours = _colours([topology for topology, _ in bases])
    series = [Series(label=label, topology=topology, dp=dp, settings=m[0].settings, colour=c)
              for label, (topology, dp), m, c in zip(labels, bases, members, colours,
                                                     strict=True)]
    return series, index


def _colours(topologies: list[str]) -> list[str]:
    """The topology's colour for its first series, then colours no other series has."""
    colours, extra = [], iter(EXTRA_COLOURS * (1 + len(topologies) // len(EXTRA_COLOURS)))
    for i, topology in enumerate(topologies):
        own = TOPOLOGY_COLOURS.get(topology)
        colours.append(own if own and topology not in topologies[:i] else next(extra))
    return colours


def comparison_rows(directories: list[Path]) -> tuple[pd.DataFrame, list[Series]]:
    """compared_runs (one row per run, with its series) and the series."""
    found = read_compared(directories)
    series, index = find_series(found)
    rows = pd.DataFrame([c.row for c in found])
    rows.insert(1, "series", [series[i].label for i in index])
    return rows, series


# ---- tables ----------------------------------------------------------------------------------


def points(rows: pd.DataFrame, series: list[Series]) -> pd.DataFrame:
    """One row per (series, epsilon): the mean all-test AUC with its interval over the
    replicates there, the oracle and gap of those runs, their largest delta and mean training
    time."""
    out = []
    order = {s.label: i for i, s in enumerate(series)}
    for (label, eps), part in rows.groupby(["series", "epsilon"], sort=False):
        mean, low, high = mean_ci(part["all_test_auc"])
        n = replicates(part["all_test_auc"])
        out.append({
            "series": label, "epsilon": eps, "n": n,
            "all_test_auc_mean": mean, "all_test_auc_ci_low": low, "all_test_auc_ci_high": high,
            "oracle_auc": _mean(part["oracle_auc"]),
            "gap_to_oracle": _mean(part["gap_to_oracle"]),
            "delta": _max(part["delta"]),
            "train_seconds": _mean(part["train_seconds"]),
            "interval": interval_method(n),
        })
    frame = pd.DataFrame(out)
    rank = frame["series"].map(order)
    return frame.assign(_rank=rank).sort_values(["_rank", "epsilon"]).drop(columns="_rank") \
        .reset_index(drop=True)


def _mean(values: pd.Series) -> float:
    x = pd.to_numeric(values, errors="coerce").dropna()
    return float(x.mean()) if len(x) else math.nan


def _max(values: pd.Series) -> float:
    x = pd.to_numeric(values, errors="coerce").dropna()
    return float(x.max()) if len(x) else math.nan


def series_table(rows: pd.DataFrame, series: list[Series]) -> pd.DataFrame:
    """compared_series: each series' runs, budgets, oracle, delta and every setting in which
    any two series differ."""
    keys = differing_keys(s.settings for s in series)
    out = []
    for s in series:
        part = rows[rows["series"] == s.label]
        out.append({
            "series": s.label, "topology": s.topology, "dp_level": s.dp, "runs": len(part),
            "epsilons": ", ".join(fmt_eps(e) for e in sorted(set(part["epsilon"]))),
            "oracle_auc": _mean(part["oracle_auc"]),
            "gap_to_oracle": _mean(part["gap_to_oracle"]),
            "delta": _max(part["delta"]),
            **{k: setting_text(s.settings.get(k, ABSENT)) for k in keys},
        })
    return pd.DataFrame(out)


def delta_note(table: pd.DataFrame) -> str:
    """Whether the series' epsilons are read at one delta; if not, each series' delta."""
    deltas = table.dropna(subset=["delta"])
    if deltas.empty:
        return "No series spends a privacy budget: there is no delta."
    values = deltas["delta"].to_numpy(dtype=float)
    if len(values) == 1 or values.max() <= values.min() * (1 + DELTA_TOLERANCE):
        return f"Every private series is accounted at δ = {fmt(float(values.max()))}."
    each = "; ".join(f"{r.series}: δ = {fmt(float(r.delta))}" for r in deltas.itertuples())
    return (f"The series are accounted at different δ ({each}): their ε are (ε, δ) "
            "guarantees at different δ and are not comparable as such.")


def repeats_note(rows: pd.DataFrame) -> str | None:
    """Points where two runs share their seed and population seed: not independent
    replicates (the same keystore repeats a run bit for bit; another draws only other noise).
    None when every replicate has seeds of its own."""
    measured = rows.dropna(subset=["all_test_auc"])
    seeds = pd.Series([f"{s}/{d}" for s, d in zip(measured["seed"], measured["data_seed"],
                                                  strict=True)], index=measured.index)
    repeated = [f"{label}, ε = {fmt_eps(eps)}"
                for (label, eps), part in seeds.groupby([measured["series"],
                                                         measured["epsilon"]], sort=False)
                if part.duplicated().any()]
    if not repeated:
        return None
    return (f"Some points average runs that share a seed and population seed "
            f"({'; '.join(repeated)}): a rerun with the same keystore repeats its run bit for bit, "
            "one with another keystore draws only other noise, so the interval there is "
            "narrower than over independent seeds.")


# ---- figure ----------------------------------------------------------------------------------


def _auc_by_epsilon(data: pd.DataFrame, series: list[Series]) -> Plot:
    fig, ax = figure()
    to_x = eps_axis(ax, data["epsilon"].to_numpy(dtype=np.float64))
    for i, s in enumerate(series):
        part = data[data["series"] == s.label]
        eps = part["epsilon"].to_numpy(dtype=np.float64)
        x = to_x(eps) * 10.0 ** dodge(i, len(series), 0.02)
        y = part["all_test_auc_mean"].to_numpy(dtype=np.float64)
        below = (y - part["all_test_auc_ci_low"].to_numpy(dtype=np.float64))
        above = (part["all_test_auc_ci_high"].to_numpy(dtype=np.float64) - y)
        level = "user" if "user" in s.dp else "off" if s.dp == "non-private" else "sample"
        ax.errorbar(x, y, yerr=[np.nan_to_num(below), np.nan_to_num(above)],
                    marker=DP_MARKERS[level], color=s.colour, linestyle="none", capsize=3,
                    label=s.label)
        # The line joins finite budgets only: the step to ∞ is not to scale.
        ax.plot(x[np.isfinite(eps)], y[np.isfinite(eps)], color=s.colour,
                linestyle="--" if level == "user" else "-")
    _oracle_lines(ax, data, series)
    ax.set_xlabel("target ε, privacy.epsilon (log scale; ∞ = non-private)")
    ax.set_ylabel(f"test AUC, {ALL}")
    ax.legend(fontsize=7)
    return Plot("topologies_auc", f"Test AUC against ε, one line per series ({ALL})",
                f"Line chart of test AUC on {ALL} against the privacy budget for each series, "
                "with 95 % intervals and each series' oracle",
                fig, data,
                note=f"Mean over the replicates (seeds, population seeds) of all_test_auc, on "
                     f"{ALL} as the oracle; bars: {LEVEL:.0%} Student t intervals (none for one "
                     "run). Dotted: each series' oracle (mean over its runs). Series at one ε "
                     "are drawn a little apart so that their bars stay visible. The target ε "
                     "is the combined "
                     "model's (vertical) or each region's (horizontal): sample-level ε "
                     "protects one customer; user-level ε a whole region's data."
                     .replace("%", " %"))


def _oracle_lines(ax: Any, data: pd.DataFrame, series: list[Series]) -> None:
    """One dotted line per oracle: a series' own in its colour, or one shared by several
    series (the same population and test set) in the oracle's colour, naming them."""
    groups: list[tuple[float, list[Series]]] = []
    for s in series:
        oracle = _mean(data.loc[data["series"] == s.label, "oracle_auc"])
        if math.isnan(oracle):
            continue
        same = next((g for o, g in groups if math.isclose(o, oracle, rel_tol=1e-9)), None)
        if same is None:
            groups.append((oracle, [s]))
        else:
            same.append(s)
    for oracle, members in groups:
        if len(members) == len(series) > 1:
            label = "oracle (the same for every series)"
        elif len(series) == 1:
            label = "oracle"
        else:
            label = "oracle, " + "; ".join(s.label for s in members)
        colour = members[0].colour if len(members) == 1 else SERIES["oracle"][1]
        ax.axhline(oracle, color=colour, linestyle=":", linewidth=1.2, label=label)


# ---- the report ------------------------------------------------------------------------------


def _series_note(rows: pd.DataFrame, series: list[Series]) -> str:
    ignored_text = ", ".join([*(f"{p}*" for p in NOT_COMPUTED_PREFIXES),
                              *sorted(OPERATIONAL_KEYS | NOT_COMPUTED_KEYS)])
    return (f"{len(rows)} run(s), {len(series)} series. Runs are averaged together only when "
            "their configurations are equal apart from privacy.epsilon (the x axis), seed and "
            f"population.seed (replicates) and settings that change no result ({ignored_text}); "
            "runs that differ in anything else are separate series. A series is named by its "
            "topology and DP level and, where several share those, by the settings in which "
            "they differ; compared_series lists every setting that differs between series.")


def build_comparison(directories: list[Path], out: Path, *,
                     figure_formats: tuple[str, ...] = FIGURE_FORMATS) -> ReportFiles:
    """Compare runs and sweeps (of either topology) at equal epsilon, one series per
    configuration; writes into `out`."""
    rows, series = comparison_rows([Path(d) for d in directories])
    out.mkdir(parents=True, exist_ok=True)
    data = points(rows, series)
    plot = _auc_by_epsilon(data, series)
    described = series_table(rows, series)
    sections = [
        Section("topologies", "Topologies at equal ε", [
            Note("Vertical: three silos hold different facts about the same people. Horizontal: "
                 "regions hold all facts about different people. Same generator, model family, "
                 "score scale and accountant."),
            Note(_series_note(rows, series)),
            plot,
            Table("topologies_by_epsilon", f"Test AUC per series at each ε ({ALL})",
                  data.drop(columns="interval"), data_key=plot.key,
                  note=f"all_test_auc: mean and {LEVEL:.0%} Student t interval over the n "
                       "replicates at each point (clipped to 0..1; none for n = 1). oracle_auc "
                       "and gap_to_oracle: means over the same runs, each against its own "
                       f"oracle. delta: the largest of those runs. {TIME_NOTE}."
                       .replace("%", " %")),
            Note(delta_note(described)),
            *[Note(text) for text in [repeats_note(rows)] if text],
        ]),
        Section("series", "Series compared", [
            Table("compared_series", "Series: what each one is", described,
                  note="oracle_auc, gap_to_oracle: means over the series' runs; delta: the "
                       "largest. The last columns are the settings in which series differ."),
        ]),
        Section("runs", "Every run compared", [
            Table("compared_runs", "Runs compared", rows, collapsed=len(rows) > 12,
                  note=f"auc: {SCORED} (metrics.json auc); all_test_auc, the oracle, the "
                       f"central references and gap_to_oracle: {ALL}. {TIME_NOTE}.")]),
    ]
    return write_report(out.resolve(), "comparison", "fedscore report: runs compared",
                        sections, figure_formats=figure_formats)
