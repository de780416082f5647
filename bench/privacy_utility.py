"""The privacy-utility table of issue 17: test AUC over label epsilon x combined model epsilon
on one generated population, every cell in ONE Flower federation on one parties directory
(simulations.run.experiment's `run_cells`, as bench/tune_defaults.py does: the engine starts
once and PSI runs once). Training settings are the defaults of server/config.py; only
privacy.label_epsilon and privacy.epsilon change.

Cells run most important first, so a run stopped early still gives a useful table:
the default cell (label 2, model 1), then the cross through it (every label epsilon at model 1,
every model epsilon at label 2), then the remaining corners. With --stop-at HH:MM (UTC) only the
cells expected to START before then are run; the cross and the corners are two federations, so
the corners' share is decided on the cross's measured seconds per cell.

Each finished cell appends one row to OUT/cells.csv at once (a partial table survives an
interrupted run) and OUT/table.md is rebuilt. A cell whose metrics.json exists is not run again.

    nice .venv/bin/python bench/privacy_utility.py --out /tmp/privacy_utility --stop-at 18:35

Per cell: test AUC, oracle AUC, gap, the combined eps_model of metrics.json (epsilon.model),
delta, the one-run canary audit's 95 % lower bound on epsilon (audit.canary), the central DP
baseline's AUC at the run's joint noise multiplier, and training seconds.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import sys
import time
from pathlib import Path

import pandas as pd
from tune_defaults import markdown  # bench/tune_defaults.py, beside this file

from simulations.run.config import make_config

log = logging.getLogger("privacy_utility")

LABEL_EPS = ("0.5", "1", "2", "4", "inf")
MODEL_EPS = ("0.5", "1", "4", "inf")
DEFAULT = ("2", "1")  # (label, model): the defaults of server/config.py
COLUMNS = ["cell", "label_eps", "model_eps", "test_auc", "oracle", "gap", "eps_model", "delta",
           "canary_lower", "membership_lower", "central_dp", "central", "sigma_joint", "steps",
           "trips", "train_s", "cell_s"]


def cell_name(label: str, model: str) -> str:
    return f"label{label}_model{model}"


def ordered_cells(labels: tuple[str, ...], models: tuple[str, ...]
                  ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(default cell + cross, remaining corners), each in run order."""
    lab0, mod0 = DEFAULT
    first = [DEFAULT] if lab0 in labels and mod0 in models else []
    first += [(lab, mod0) for lab in labels if lab != lab0 and mod0 in models]
    first += [(lab0, mod) for mod in models if mod != mod0 and lab0 in labels]
    corners = [(lab, mod) for lab in labels for mod in models
               if lab != lab0 and mod != mod0]
    return first, corners


def row_of(run_dir: Path, cell_seconds: float = math.nan) -> dict | None:
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    audit = m.get("audit") or {}
    canary = audit.get("canary") or {}
    central_dp = m.get("baseline_central_dp_auc")
    return {
        "cell": run_dir.name,
        "label_eps": cfg["privacy.label_epsilon"],
        "model_eps": cfg["privacy.epsilon"],
        "test_auc": m["all_test_auc"],  # beside the oracle: every test person
        "oracle": m["oracle_auc"],
        "gap": m["gap_to_oracle"],
        "eps_model": (m.get("epsilon") or {}).get("model"),
        "delta": m.get("delta"),
        "canary_lower": canary.get("epsilon_lower_bound", math.nan),
        "membership_lower": audit.get("epsilon_lower", math.nan),
        "central_dp": central_dp if central_dp is not None else math.nan,
        "central": m["baseline_central_auc"],
        "sigma_joint": m.get("joint_noise_multiplier", m.get("noise_multiplier")),
        "steps": m.get("training_steps"),
        "trips": m.get("round_trips"),
        "train_s": m["seconds"]["train"],
        "cell_s": cell_seconds,
    }


def eps_key(value: object) -> float:
    return float(value) if value is not None else math.nan


def write_tables(out: Path) -> pd.DataFrame:
    """OUT/table.md from OUT/cells.csv: the AUC grid (rows label eps, columns model eps) and
    the per-cell details."""
    path = out / "cells.csv"
    if not path.exists():
        return pd.DataFrame()
    rows = pd.read_csv(path).drop_duplicates("cell", keep="last")
    grid = rows.pivot_table(index="label_eps", columns="model_eps", values="test_auc")
    grid = grid.reindex(sorted(grid.index, key=eps_key), axis=0)
    grid = grid.reindex(sorted(grid.columns, key=eps_key), axis=1)
    shown = pd.DataFrame({"label eps \\ model eps": [f"{v:g}" for v in grid.index]})
    for c in grid.columns:
        shown[f"model {c:g}"] = grid[c].to_numpy()
    details = rows.assign(delta=[f"{d:.2e}" for d in rows["delta"]])
    text = "Test AUC\n\n" + markdown(shown) + "\nPer cell (in run order)\n\n" + markdown(details)
    (out / "table.md").write_text(text)
    return rows


def run_group(cells: list[tuple[str, str]], out: Path, parties: Path, users: int, seed: int,
              stop_at: dt.datetime | None, seconds_per_cell: float) -> list[float]:
    """The unfinished `cells` in one federation; returns each finished cell's seconds."""
    from simulations.run.engine import configure_environment, quiet_engine_logs
    from simulations.run.experiment import run_cells

    todo = [c for c in cells if not (out / "runs" / cell_name(*c) / "metrics.json").exists()]
    for c in todo:
        if (out / "runs" / cell_name(*c)).exists():
            raise SystemExit(f"{out / 'runs' / cell_name(*c)} is unfinished; move it aside")
    if stop_at is not None and todo:
        # Engine start + PSI ~ 45 s, then cells one after another: keep those expected to
        # start before the stop time.
        left = (stop_at - dt.datetime.now(dt.UTC)).total_seconds() - 45
        fit = max(0, math.ceil(left / seconds_per_cell)) if left > 0 else 0
        if fit < len(todo):
            log.warning("stop at %s: %d of %d cells fit (%.0f s per cell); skipping %s",
                        stop_at.strftime("%H:%M"), fit, len(todo), seconds_per_cell,
                        ", ".join(cell_name(*c) for c in todo[fit:]))
            todo = todo[:fit]
    if not todo:
        return []
    configure_environment()
    quiet_engine_logs()
    names = [cell_name(*c) for c in todo]
    configs = [(make_config({"privacy.label_epsilon": lab, "privacy.epsilon": mod}, users, seed),
                out / "runs" / name, False) for (lab, mod), name in zip(todo, names, strict=True)]
    csv_path = out / "cells.csv"
    t0 = time.perf_counter()
    last = [t0]
    seconds: list[float] = []

    def done(i: int, error: str) -> None:
        try:
            record(i, error)
        except Exception:  # a bookkeeping slip must not stop the federation's other cells
            log.exception("%s: recording failed (its run directory is complete)", names[i])

    def record(i: int, error: str) -> None:
        now = time.perf_counter()
        took, last[0] = now - last[0], now
        row = row_of(out / "runs" / names[i], round(took, 1)) if not error else None
        if row is None:
            log.error("%s failed: %s", names[i], error)
            return
        seconds.append(took)
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        write_tables(out)
        log.info("%-22s test %.4f oracle %.4f gap %.4f eps_model %.3f canary>=%.3f "
                 "central_dp %.4f train %.1f s (cell %.0f s, %.0f s so far)", names[i],
                 row["test_auc"], row["oracle"], row["gap"], eps_key(row["eps_model"]),
                 row["canary_lower"], row["central_dp"], row["train_s"], took, now - t0)

    log.info("%d cells in one federation: %s", len(names), ", ".join(names))
    errors = run_cells(configs, parties, on_done=done)
    log.info("%d cells in %.0f s (%d failed)", len(names), time.perf_counter() - t0,
             sum(bool(e) for e in errors))
    # The first cell also carries engine start and PSI: leave it out of the per-cell figure.
    return seconds[1:] or seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parties", type=Path, help="parties directory (default OUT/parties)")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0, help="population and training seed")
    ap.add_argument("--label", nargs="+", default=list(LABEL_EPS))
    ap.add_argument("--model", nargs="+", default=list(MODEL_EPS))
    ap.add_argument("--stop-at", help="HH:MM UTC: start no cell expected to begin later")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    stop_at = None
    if args.stop_at:
        h, m = (int(x) for x in args.stop_at.split(":"))
        stop_at = dt.datetime.now(dt.UTC).replace(hour=h, minute=m, second=0,
                                                           microsecond=0)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    parties = args.parties or out / "parties"
    first, corners = ordered_cells(tuple(args.label), tuple(args.model))
    per_cell = 60.0
    for group in (first, corners):
        measured = run_group(group, out, parties, args.users, args.seed, stop_at, per_cell)
        if measured:
            per_cell = sum(measured) / len(measured)
    rows = write_tables(out)
    if not rows.empty:
        print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
