"""Privacy-budget sweeps: one run per (epsilon, seed) cell, with baselines and an audit each.

    DIR/sweep.json              what the sweep is (epsilons, seeds, users, --set overrides)
    DIR/parties/seed=S/         the population of seed S, shared by that seed's cells
    DIR/runs/eps=E_seed=S/      an ordinary run directory (fedscore report works on it)
    DIR/sweep.csv               one row per finished or failed cell
    DIR/summary.csv             per epsilon: mean and 95 % confidence interval over seeds
    DIR/unfinished/CELL-N/      a cell's attempt that stopped before its first round (kept)

Populations as in metrics.json: `auc` is the score's AUC on the scored (eligible) test
people; every other AUC column (`auc_all_test`, the baselines', the oracle's) is on every
test person.

The cells of one seed share one Flower federation: the engine starts once and PSI runs once,
since the population and the parties' keys do not change between epsilons; each cell still
gets its own run key, model, accountants, ledger and checkpoint. A finished cell (its
metrics.json exists) is never run again, so an interrupted sweep continues where it stopped:
repeating its command resumes a cell interrupted mid-training from its checkpoint, and starts
again one that never finished a round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from server.privacy import model_epsilon
from simulations.run.config import ExperimentConfig, make_config

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


class SweepError(ValueError):
    """A sweep that cannot run as asked; nothing was changed."""


def parse_epsilons(text: str) -> tuple[float, ...]:
    """`0.5,1,2,inf` -> (0.5, 1.0, 2.0, inf), sorted; refuses what is not a positive number."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            raise SweepError(
                f"--epsilons: {item!r} is not a number; write e.g. 0.5,1,2,4,8,inf"
            ) from None
        if math.isnan(value) or value <= 0:
            raise SweepError(
                f"--epsilons: {item!r} must be > 0 (epsilon is a privacy budget; inf = no DP)"
            )
        values.append(value)
    if len(set(values)) != len(values):
        raise SweepError(f"--epsilons {text!r} names an epsilon twice")
    return tuple(sorted(values))


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t.strip()) for t in text.split(","))
    except ValueError:
        raise SweepError(f"--seeds {text!r}: write whole numbers, e.g. 0,1,2") from None
    if len(set(values)) != len(values) or any(v < 0 for v in values):
        raise SweepError(f"--seeds {text!r}: give distinct seeds >= 0")
    return values


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


@dataclass(frozen=True)
class SweepSpec:
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    users: int | None = None
    assignments: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        keys = {k for k, _ in self.assignments}
        for fixed in ("privacy.epsilon", "seed", "population.seed"):
            if fixed in keys:
                raise SweepError(f"--set {fixed}=... is what the sweep varies; use --epsilons "
                                 "and --seeds instead")
        # Every cell's config must be valid before anything runs.
        for eps in self.epsilons:
            self.config(eps, self.seeds[0])

    def config(self, eps: float, seed: int) -> ExperimentConfig:
        values = {**dict(self.assignments), "privacy.epsilon": eps}
        return make_config(values, self.users, seed)

    def to_json(self) -> dict:
        out = asdict(self)
        out["epsilons"] = [eps_label(e) for e in self.epsilons]
        out["assignments"] = dict(self.assignments)
        return out


@dataclass(frozen=True)
class Cell:
    eps: float
    seed: int

    @property
    def name(self) -> str:
        return f"eps={eps_label(self.eps)}_seed={self.seed}"


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.name


def claim_sweep(out: Path, spec: SweepSpec) -> None:
    """Write sweep.json, or check that an existing sweep in `out` is this same sweep."""
    path = out / SWEEP_FILE
    wanted = json.loads(json.dumps(spec.to_json()))  # as it reads back (lists, not tuples)
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        if changed:
            raise SweepError(
                f"{out} holds a sweep made with another configuration ({', '.join(changed)} "
                "differ from its sweep.json); choose a new --out, or repeat the same command "
                "to continue that sweep"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"{out} holds files but no sweep.json; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2) + "\n")


def is_done(out: Path, cell: Cell) -> bool:
    return (cell_dir(out, cell) / "metrics.json").exists()


def set_aside_unfinished(out: Path, cell: Cell) -> bool:
    """An unfinished cell resumes from its checkpoint, or at its baselines when its federated
    part finished (returns True); otherwise (it never finished a round: interrupted early, or
    failed) its directory is renamed aside (kept, never deleted) and the cell starts over."""
    from simulations.run.rundir import resumable

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


def cell_row(out: Path, cell: Cell, status: str = "done", error: str = "") -> dict:
    """One sweep.csv row from a cell's metrics.json (or a failure)."""
    row: dict = {"epsilon": cell.eps, "seed": cell.seed, "run": cell.name, "status": status}
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
    for seed in spec.seeds:
        for eps in spec.epsilons:
            cell = Cell(eps, seed)
            if is_done(out, cell):
                rows.append(cell_row(out, cell))
            elif cell.name in failures:
                rows.append(cell_row(out, cell, "failed", failures[cell.name]))
    table = pd.DataFrame(rows)
    _atomic_csv(table, out / RESULTS_FILE)
    _atomic_csv(summarise(table), out / SUMMARY_FILE)
    return table


def mean_ci(values: pd.Series, level: float = 0.95, bounds: tuple[float, float] = (0.0, 1.0)
            ) -> tuple[float, float, float]:
    """Mean and a Student-t confidence interval over seeds (NaN interval for one seed),
    clipped to the metric's range (AUC: 0..1)."""
    x = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return (mean, math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return (mean, max(bounds[0], mean - half), min(bounds[1], mean + half))


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty or "auc" not in table:
        return pd.DataFrame(columns=["epsilon", "n", "auc_mean", "auc_ci_low", "auc_ci_high"])
    done = table[table["status"] == "done"]
    rows = []
    for eps, group in done.groupby("epsilon", sort=True):
        row: dict = {"epsilon": eps, "n": len(group)}
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
    return pd.DataFrame(rows)


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


# ---- running ---------------------------------------------------------------------------------


CellProgress = Callable[[str, Cell | None], None]


def run_sweep(out: Path, spec: SweepSpec, on_cell: CellProgress | None = None,
              progress: Callable[..., None] | None = None) -> pd.DataFrame:
    """Run every unfinished cell, one federation per seed; returns the sweep.csv table."""
    from simulations.run.experiment import run_cells  # the engine is heavy: import when running

    claim_sweep(out, spec)
    failures: dict[str, str] = {}
    for seed in spec.seeds:
        todo = [Cell(eps, seed) for eps in spec.epsilons if not is_done(out, Cell(eps, seed))]
        if not todo:
            continue
        resumes = {c.name: set_aside_unfinished(out, c) for c in todo}
        t0 = time.perf_counter()

        def on_done(i: int, err: str, todo: list[Cell] = todo) -> None:
            if on_cell:
                on_cell(err or "done", todo[i])

        outcomes = run_cells(
            [(spec.config(c.eps, c.seed), cell_dir(out, c), resumes[c.name]) for c in todo],
            out / "parties" / f"seed={seed}",
            progress=progress,
            on_done=on_done,
        )
        for cell, error in zip(todo, outcomes, strict=True):
            if error:
                failures[cell.name] = error
        log.info("seed %d: %d cells in %.0f s", seed, len(todo), time.perf_counter() - t0)
        write_results(out, spec, failures)
    return write_results(out, spec, failures)

