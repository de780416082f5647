"""Sweeps: one run per cell of a grid of config values x data seeds x training seeds, with
baselines and an audit each.

    DIR/sweep.json              what the sweep is (grid, seeds, data seeds, users, --set, reference)
    DIR/parties/seed=S[_population.K=V]/  one population, shared by the cells that use it
    DIR/runs/<cell>/            an ordinary run directory (fedscore report works on it)
    DIR/sweep.csv               one row per finished or failed cell
    DIR/summary.csv             per grid point: means with intervals, and paired differences
                                against the reference point
    DIR/unfinished/CELL-N/      a cell's attempt that stopped before its first round (kept)

Cells and their names: simulations/run/grid.py.

Populations as in metrics.json: `auc` is the score's AUC on the scored (eligible) test
people; every other AUC column (`auc_all_test`, the baselines', the oracle's) is on every
test person.

The cells of one population share one Flower federation: the engine starts once and PSI runs
once, since the population and the parties' keys do not change between cells; each cell still
gets its own run key, model, accountants, ledger and checkpoint. A finished cell (its
metrics.json exists) is never run again: repeating the command resumes a cell interrupted
mid-training from its checkpoint and starts again one that never finished a round, and the same
command with more values or seeds extends the sweep, running only the new cells. A sweep never
mixes configurations: every other difference from its sweep.json is refused.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crypto.private_files import write_atomic
from server.config_keys import coerce
from server.privacy import model_epsilon
from simulations.data.paths import grid_columns
from simulations.report.stats import interval_method, mean_ci
from simulations.run.config import from_flat, known_keys
from simulations.run.grid import EPSILON_KEY, Cell, SweepError, SweepSpec, point_name
from simulations.run.rundir import resumable

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "sweep.csv"
SUMMARY_FILE = "summary.csv"
# Attempts of cells that stopped before their first round, kept outside runs/ so that what
# reads every cell (ledger verify, reports) never mistakes one for a cell of the sweep.
UNFINISHED_DIR = "unfinished"
ALL_TEST_COLUMNS = {  # sweep.csv column -> metrics.json key, each on every test person
    "auc_all_test": "all_test_auc",
    "auc_central": "baseline_central_auc",
    "auc_central_dp": "baseline_central_dp_auc",
    "auc_central_gbdt": "baseline_central_gbdt_auc",
    "auc_central_scorecard": "baseline_central_scorecard_auc",
    "auc_best_silo": "baseline_best_silo_auc",
    "auc_oracle": "oracle_auc",
}
def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.name


ALL_OPTIONS = frozenset({"grid", "seeds", "data_seeds", "users", "assignments", "reference"})


def plan_sweep(out: Path, asked: SweepSpec, *, given: Iterable[str] = ALL_OPTIONS
               ) -> SweepSpec:
    """The sweep to run in `out`, changing nothing: `asked` for a new one, or the sweep already
    there extended by `asked` (SweepSpec.extended_by; `given`: the options the command set).
    The cells already in `out` must be runs of their configs."""
    path = out / SWEEP_FILE
    if path.exists():
        saved = SweepSpec.from_json(json.loads(path.read_text()))
        spec = saved.extended_by(asked, given=set(given))
        check_cells(out, spec)
        return spec
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"{out} holds files but no sweep.json; choose a new --out")
    return asked


def claim_sweep(out: Path, spec: SweepSpec) -> None:
    """Write the sweep.json of a planned sweep (plan_sweep), new or extended."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / SWEEP_FILE, json.dumps(spec.to_json(), indent=2) + "\n", public=True)


def check_cells(out: Path, spec: SweepSpec) -> None:
    """Refuse a sweep whose cell directories hold runs of other configurations (a sweep.json
    edited by hand, a directory copied in), or whose finished cells drew their split in an
    older way than the cells still to run would: nothing is ever summarised or paired with
    what it is not."""
    old_split = []
    for cell in spec.cells():
        path = cell_dir(out, cell) / "config.json"
        if path.exists() and from_flat(json.loads(path.read_text())) != spec.config(cell):
            raise SweepError(f"{cell_dir(out, cell)} holds a run of another configuration "
                             f"than the sweep's cell {cell.name}; move it away")
        if is_done(out, cell) and not _split_recorded(cell_dir(out, cell)):
            old_split.append(cell.name)
    if old_split and not all(is_done(out, c) for c in spec.cells()):
        raise SweepError(
            f"{len(old_split)} finished cells of this sweep (e.g. {old_split[0]}) were split by "
            "an earlier fedscore, whose split changed with every setting; new cells would test "
            "on other people and their paired differences would mean little. Start a new "
            "sweep (a new --out); this one still reports as it is")


def _split_recorded(run_dir: Path) -> bool:
    """Whether the run's authority recorded what keys its split (`split_from`)."""
    try:
        return "split_from" in json.loads((run_dir / "authority.json").read_text())
    except (OSError, ValueError):
        return False


def is_done(out: Path, cell: Cell) -> bool:
    return (cell_dir(out, cell) / "metrics.json").exists()


def set_aside_unfinished(out: Path, cell: Cell) -> bool:
    """An unfinished cell resumes from its checkpoint, or at its baselines when its federated
    part finished (returns True); otherwise (it never finished a round: interrupted early, or
    failed) its directory is renamed aside (kept, never deleted) and the cell starts over."""
    directory = cell_dir(out, cell)
    if not directory.exists():
        return False
    if (directory / "config.json").exists() and resumable(directory):
        return True
    aside = out / UNFINISHED_DIR
    aside.mkdir(exist_ok=True)
    n = 1
    while (aside / f"{cell.name}-{n}").exists():
        n += 1
    directory.rename(aside / f"{cell.name}-{n}")
    log.warning("cell %s never finished a round; starting it again (the stopped attempt is "
                "kept as %s/%s-%d)", cell.name, UNFINISHED_DIR, cell.name, n)
    return False


# ---- results -----------------------------------------------------------------------------------


def _csv_value(key: str, text: str) -> Any:
    """A grid value as sweep.csv and summary.csv hold it: a number for a numeric key (so it
    sorts and plots), its canonical spelling otherwise ("32,16", "true", "prv")."""
    key = "privacy.epsilon" if key == "epsilon" else key
    typed = coerce(key, known_keys()[key], text)
    return typed if isinstance(typed, int | float) and not isinstance(typed, bool) else text


def cell_row(out: Path, spec: SweepSpec, cell: Cell, status: str = "done",
             error: str = "") -> dict:
    """One sweep.csv row from a cell's metrics.json (or a failure)."""
    point = dict(cell.point)
    row: dict = {"epsilon": spec.config(cell).authority.privacy.epsilon}
    row.update({k: _csv_value(k, v) for k, v in point.items() if k != EPSILON_KEY})
    row.update({"data_seed": cell.population_seed, "seed": cell.seed, "run": cell.name,
                "status": status})
    path = cell_dir(out, cell) / "metrics.json"
    if status == "done" and path.exists():
        metrics = json.loads(path.read_text())
        row["auc"] = metrics["auc"]
        row.update({col: metrics.get(key) for col, key in ALL_TEST_COLUMNS.items()})
        row["eps_model"] = model_epsilon(metrics) or math.inf
        row["eps_label"] = metrics["epsilon"]["label"]
        audit = metrics.get("audit") or {}
        row["audit_canary_epsilon_lower"] = (audit.get("canary") or {}).get(
            "epsilon_lower_bound")
        row["audit_epsilon_lower"] = audit.get("epsilon_lower")
        row["audit_attack_auc"] = audit.get("attack_auc")
        row["seconds"] = metrics["seconds"]["total"]
    else:
        row["error"] = error
    return row


def write_results(out: Path, spec: SweepSpec, failures: dict[str, str]) -> pd.DataFrame:
    """sweep.csv and summary.csv from every cell's own files, so nothing depends on memory."""
    rows = []
    for cell in spec.cells():
        if is_done(out, cell):
            rows.append(cell_row(out, spec, cell))
        elif cell.name in failures:
            rows.append(cell_row(out, spec, cell, "failed", failures[cell.name]))
    table = pd.DataFrame(rows)
    _atomic_csv(table, out / RESULTS_FILE)
    summary = summarise(table, grid_columns(spec.grid), spec.reference_point)
    _atomic_csv(summary, out / SUMMARY_FILE)
    return table


def summarise(table: pd.DataFrame, groups: list[str] | None = None,
              reference: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per grid point (the `groups` columns; default: epsilon): means with Student-t intervals
    over its runs, and the mean paired difference of `auc` against the `reference` point
    (differences of runs with the same data seed and seed, then a Student-t interval over
    those differences: seed-to-seed variation cancels, so it is far narrower than comparing two
    intervals)."""
    groups = groups or ["epsilon"]
    if table.empty or "auc" not in table:
        return pd.DataFrame(columns=[*groups, "n", "auc_mean", "auc_ci_low", "auc_ci_high"])
    done = table[table["status"] == "done"]
    rows = []
    for key, group in done.groupby(groups, sort=True):
        row: dict = dict(zip(groups, key, strict=True))
        row["n"] = len(group)
        row["auc_mean"], row["auc_ci_low"], row["auc_ci_high"] = mean_ci(group["auc"])
        for col in ALL_TEST_COLUMNS:
            name = col.removeprefix("auc_")
            # A sweep from before a baseline existed has no column for it.
            row[f"{name}_mean"], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = mean_ci(
                group.get(col, pd.Series(dtype=float)))
        row["eps_model_max"] = pd.to_numeric(group["eps_model"]).max()
        row["audit_epsilon_lower_max"] = pd.to_numeric(group["audit_epsilon_lower"]).max()
        if "audit_canary_epsilon_lower" in group:
            row["audit_canary_epsilon_lower_max"] = pd.to_numeric(
                group["audit_canary_epsilon_lower"]).max()
        rows.append(row)
    summary = pd.DataFrame(rows)
    if reference is not None:
        summary = _paired_differences(done, summary, groups, reference)
    return summary


def _paired_differences(done: pd.DataFrame, summary: pd.DataFrame, groups: list[str],
                        reference: Mapping[str, str]) -> pd.DataFrame:
    ref_values = {("epsilon" if k == EPSILON_KEY else k): _csv_value(k, v)
                  for k, v in reference.items()}
    for col in groups:  # a grid without epsilon: the reference has the sweep's one epsilon
        ref_values.setdefault(col, done[col].iloc[0])
    is_ref = np.logical_and.reduce([summary[c] == ref_values[c] for c in groups])
    pair = [c for c in ("data_seed", "seed") if c in done]
    at_ref = done.loc[np.logical_and.reduce([done[c] == ref_values[c] for c in groups])]
    ref_auc = at_ref.drop_duplicates(pair).set_index(pair)["auc"]
    diffs = []
    for _, row in summary.iterrows():
        mask = np.logical_and.reduce([done[c] == row[c] for c in groups])
        mine = done.loc[mask].drop_duplicates(pair).set_index(pair)["auc"]
        common = mine.index.intersection(ref_auc.index)
        d = (mine.loc[common] - ref_auc.loc[common]).astype(float)
        diffs.append((*mean_ci(d, bounds=(-1.0, 1.0)), len(common)))
    frame = pd.DataFrame(diffs, columns=["auc_diff_mean", "auc_diff_ci_low", "auc_diff_ci_high",
                                         "auc_diff_n"])
    frame.loc[is_ref, :] = np.nan
    summary = pd.concat([summary, frame], axis=1)
    summary["reference"] = point_name((k, v) for k, v in sorted(reference.items()))
    summary["is_reference"] = is_ref
    summary["interval"] = [
        interval_method(int(n))
        + ("" if ref or not m else f"; difference paired by (data seed, seed) over {int(m)}")
        for n, m, ref in zip(summary["n"], summary["auc_diff_n"].fillna(0), is_ref,
                             strict=True)]
    return summary


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, frame.to_csv(index=False), public=True)


# ---- running ---------------------------------------------------------------------------------


CellProgress = Callable[[str, Cell | None], None]


def run_sweep(out: Path, spec: SweepSpec, on_cell: CellProgress | None = None,
              progress: Callable[..., None] | None = None, *,
              given: Iterable[str] = ALL_OPTIONS) -> pd.DataFrame:
    """Run every unfinished cell, one federation per population; returns the sweep.csv table.
    An existing sweep in `out` is continued, and extended by what `spec` adds to it."""
    from simulations.run.experiment import run_cells  # the engine is heavy: import when running

    spec = plan_sweep(out, spec, given=given)
    claim_sweep(out, spec)
    failures: dict[str, str] = {}
    for population, group in itertools.groupby(spec.cells(), key=lambda c: c.population):
        todo = [c for c in group if not is_done(out, c)]
        if not todo:
            continue
        resumes = {c.name: set_aside_unfinished(out, c) for c in todo}
        t0 = time.perf_counter()

        def on_done(i: int, err: str, todo: list[Cell] = todo) -> None:
            if on_cell:
                on_cell(err or "done", todo[i])

        outcomes = run_cells(
            [(spec.config(c), cell_dir(out, c), resumes[c.name]) for c in todo],
            out / "parties" / population,
            progress=progress,
            on_done=on_done,
        )
        for cell, error in zip(todo, outcomes, strict=True):
            if error:
                failures[cell.name] = error
        log.info("population %s: %d cells in %.0f s", population, len(todo),
                 time.perf_counter() - t0)
        write_results(out, spec, failures)
    return write_results(out, spec, failures)
