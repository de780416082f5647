"""Sweeps: one run per cell of a grid of config values x data seeds x training seeds, with
baselines and an audit each.

    DIR/sweep.json              what the sweep is (grid, seeds, data seeds, users, --set, reference)
    DIR/parties/seed=S[_population.K=V]/  one population, shared by the cells that use it
    DIR/runs/<cell>/            an ordinary run directory (fedscore report works on it)
    DIR/sweep.csv               one row per finished or failed cell
    DIR/summary.csv             per grid point: means with intervals, and paired differences
                                against the reference point
    DIR/unfinished/CELL-N/      a cell's attempt that stopped before its first round (kept)

A cell's name is its grid point (keys sorted, privacy.epsilon written `eps`), then `data=D`
when the sweep has its own data seeds, then `seed=S`: `eps=1_seed=0`,
`eps=1_train.lr=0.003_data=0_seed=2`. `seed` is the training seed (initialisation; DP noise and
batches come from the keystores); `data_seed` is population.seed. Without data seeds each cell's
population is the one of its training seed, as in a single `fedscore run --seed S`.

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
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from server.config import ConfigError, coerce, unknown_key_error
from server.privacy import model_epsilon
from simulations.report.stats import interval_method, mean_ci
from simulations.run.config import (
    DATA_KEY,
    POPULATION_PREFIX,
    ExperimentConfig,
    from_flat,
    known_keys,
    make_config,
)

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "sweep.csv"
SUMMARY_FILE = "summary.csv"
# Attempts of cells that stopped before their first round, kept outside runs/ so that what
# reads every cell (ledger verify, reports) never mistakes one for a cell of the sweep.
UNFINISHED_DIR = "unfinished"
EPSILON_KEY = "privacy.epsilon"
DEFAULT_EPSILONS = "0.5,1,2,4,8,inf"

# Keys a grid cannot vary, and what to use instead: the cells of one population share one
# federation (one topology, one data source, one keystore), and seeds have options of their own.
NOT_SWEPT = {
    "seed": "use --seeds (training seeds)",
    "population.seed": "use --data-seeds",
    "topology": "sweep one topology per sweep and put two sweeps side by side with "
                "`fedscore compare`",
    DATA_KEY: "use --data; one data source per sweep",
}
NOT_SWEPT_PREFIXES = ("storage.",)

ALL_TEST_COLUMNS = {  # sweep.csv column -> metrics.json key, each on every test person
    "auc_all_test": "all_test_auc",
    "auc_central": "baseline_central_auc",
    "auc_central_dp": "baseline_central_dp_auc",
    "auc_central_gbdt": "baseline_central_gbdt_auc",
    "auc_central_scorecard": "baseline_central_scorecard_auc",
    "auc_best_silo": "baseline_best_silo_auc",
    "auc_oracle": "oracle_auc",
}
# A value becomes part of a directory name: plain words and numbers only.
_PLAIN = re.compile(r"[A-Za-z0-9.,+\-]+")


class SweepError(ValueError):
    """A sweep that cannot run as asked; nothing was changed."""


# ---- values ------------------------------------------------------------------------------------


def canonical(value: Any) -> str:
    """One spelling per value, as the grid, sweep.json and cell names write it; reads back
    through the config's coercion to the same value (floats shortest first: 1 not 1.0)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, tuple):
        return ",".join(canonical(v) for v in value)
    return str(value)


def split_values(text: str) -> list[str]:
    """`0.003,0.01` -> two values; `[32,16],[64]` -> two tuple values (brackets group commas)."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth < 0:
            raise SweepError(f"{text!r}: a ']' without its '['")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise SweepError(f"{text!r}: a '[' without its ']'")
    items.append(current)
    return [item.strip().removeprefix("[").removesuffix("]").strip() for item in items]


def grid_values(key: str, values: Iterable[Any]) -> tuple[str, ...]:
    """A grid key's values, checked and written canonically, in the order given."""
    types = known_keys()
    if key not in types:
        raise unknown_key_error(key, types)
    if key in NOT_SWEPT or key.startswith(NOT_SWEPT_PREFIXES):
        raise SweepError(f"--grid {key}: a sweep cannot vary {key}; "
                         f"{NOT_SWEPT.get(key, 'it says where files live, not what is run')}")
    out = []
    for value in values:
        if isinstance(value, str) and not value.strip():
            raise SweepError(f"--grid {key}: an empty value; write e.g. {key}=1,2")
        typed = coerce(key, types[key], value)
        if key == EPSILON_KEY and (math.isnan(typed) or typed <= 0):
            raise SweepError(f"--grid {key}={value!r} must be > 0 (epsilon is a privacy "
                             "budget; inf = no DP)")
        text = canonical(typed)
        if not _PLAIN.fullmatch(text):
            raise SweepError(f"--grid {key}={value!r}: a swept value names a directory; only "
                             "letters, digits and . , + - are allowed")
        out.append(text)
    if not out:
        raise SweepError(f"--grid {key}: give at least one value")
    if len(set(out)) != len(out):
        raise SweepError(f"--grid {key}: a value is named twice ({', '.join(out)})")
    return tuple(out)


def parse_grid(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """`--grid key=v1,v2` options into {key: canonical values}, in the order given."""
    grid: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid {item!r}: write key=value,value, e.g. "
                             "--grid train.lr=0.003,0.01")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice; list all its values in one --grid")
        grid[key] = grid_values(key, split_values(text))
    return grid


def parse_epsilons(text: str) -> tuple[str, ...]:
    """`--epsilons 8,0.5,inf`: privacy.epsilon's grid values, sorted (inf last)."""
    try:
        values = grid_values(EPSILON_KEY, split_values(text))
    except (SweepError, ConfigError) as exc:
        raise SweepError(f"--epsilons: {exc}; write e.g. 0.5,1,2,4,8,inf") from None
    return tuple(sorted(values, key=float))


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    try:
        values = tuple(int(t.strip()) for t in text.split(","))
    except ValueError:
        raise SweepError(f"{option} {text!r}: write whole numbers, e.g. 0,1,2") from None
    if len(set(values)) != len(values) or any(v < 0 for v in values):
        raise SweepError(f"{option} {text!r}: give distinct seeds >= 0")
    return values


def parse_reference(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"--reference {item!r}: write key=value, e.g. "
                             "--reference privacy.epsilon=inf")
        (out[key.strip()],) = grid_values(key.strip(), [value.strip()])
    return out


def eps_label(eps: float) -> str:
    return canonical(float(eps))


# ---- what a sweep is -------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a grid point (key, canonical value) sorted by key, and its seeds."""

    point: tuple[tuple[str, str], ...]
    seed: int
    data_seed: int | None = None  # None: the population of the training seed

    @property
    def population_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def point_name(self) -> str:
        return point_name(self.point)

    @property
    def name(self) -> str:
        parts = [self.point_name] if self.point else []
        if self.data_seed is not None:
            parts.append(f"data={self.data_seed}")
        return "_".join([*parts, f"seed={self.seed}"])

    @property
    def population(self) -> str:
        """The directory name of this cell's population under DIR/parties."""
        varied = [f"{k}={v}" for k, v in self.point if k.startswith(POPULATION_PREFIX)]
        return "_".join([f"seed={self.population_seed}", *varied])


def point_name(point: Iterable[tuple[str, str]]) -> str:
    return "_".join(f"{'eps' if k == EPSILON_KEY else k}={v}" for k, v in point)


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A sweep: every combination of the grid's values, for each data seed and training seed.

    grid: {config key: values} (`--grid`, `--epsilons`); values as numbers or strings.
    seeds: training seeds. data_seeds: population seeds, or None for each cell's training seed.
    reference: the grid point paired differences are taken against; missing keys default to
    privacy.epsilon's largest value (inf: the non-private run) and each other key's first.
    """

    grid: Mapping[str, Sequence[Any]]
    seeds: tuple[int, ...]
    data_seeds: tuple[int, ...] | None = None
    users: int | None = None
    assignments: tuple[tuple[str, str], ...] = ()
    reference: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        grid = {k: grid_values(k, v) for k, v in self.grid.items()}
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if self.data_seeds is not None:
            object.__setattr__(self, "data_seeds", tuple(self.data_seeds))
        if not self.seeds:
            raise SweepError("--seeds: give at least one seed")
        swept = {**{k: f"--grid {k}" for k in grid}, "seed": "--seeds",
                 "population.seed": "--data-seeds"}
        for key, _ in self.assignments:
            if key in swept:
                raise SweepError(f"--set {key}=... is what the sweep varies; use {swept[key]} "
                                 "instead")
        object.__setattr__(self, "reference", self._reference(grid))
        # Every cell's config must be valid before anything runs.
        for point in self.points():
            self.config(Cell(point, self.seeds[0], None))

    def _reference(self, grid: dict[str, tuple[str, ...]]) -> dict[str, str]:
        given = {k: grid_values(k, [v])[0] for k, v in self.reference.items()}
        for key, value in given.items():
            if key not in grid or value not in grid[key]:
                raise SweepError(f"--reference {key}={value}: not a point of the grid "
                                 f"({', '.join(f'{k}={list(v)}' for k, v in grid.items())})")
        default = {k: (max(v, key=float) if k == EPSILON_KEY else v[0]) for k, v in grid.items()}
        return {k: given.get(k, default[k]) for k in sorted(grid)}

    def points(self) -> list[tuple[tuple[str, str], ...]]:
        keys = sorted(self.grid)
        return [tuple(zip(keys, values, strict=True))
                for values in itertools.product(*(self.grid[k] for k in keys))]

    def cells(self) -> list[Cell]:
        """Every cell, grouped by population (data seed first), then point, then seed."""
        data = self.data_seeds if self.data_seeds is not None else (None,)
        cells = [Cell(p, s, d) for d in data for s in self.seeds for p in self.points()]
        return sorted(cells, key=lambda c: (c.population_seed, c.population))

    def config(self, cell: Cell) -> ExperimentConfig:
        values = {**dict(self.assignments), **dict(cell.point), "seed": cell.seed,
                  "population.seed": cell.population_seed}
        return make_config(values, self.users)

    def to_json(self) -> dict:
        return {"grid": {k: list(v) for k, v in self.grid.items()}, "seeds": list(self.seeds),
                "data_seeds": None if self.data_seeds is None else list(self.data_seeds),
                "users": self.users, "assignments": dict(self.assignments),
                "reference": dict(self.reference)}

    @classmethod
    def from_json(cls, saved: dict) -> SweepSpec:
        """sweep.json, also as sweeps before grids wrote it (epsilons and seeds only)."""
        grid = saved.get("grid")
        if grid is None:
            grid = {EPSILON_KEY: saved["epsilons"]}
        return cls(grid=grid, seeds=tuple(saved["seeds"]),
                   data_seeds=None if saved.get("data_seeds") is None
                   else tuple(saved["data_seeds"]),
                   users=saved.get("users"),
                   assignments=tuple(sorted(saved.get("assignments", {}).items())),
                   reference=saved.get("reference") or {})

    def extended_by(self, asked: SweepSpec, *, given: set[str]) -> SweepSpec:
        """This saved sweep with the values and seeds of `asked` added. `given` names the options
        the command set (grid, seeds, data_seeds, users, assignments, reference): the others
        keep the sweep's. What is not a value or a seed must be the same: a sweep is one
        configuration, so its cells can be summarised together."""
        changed = []
        if "users" in given and asked.users != self.users:
            changed.append("--users")
        if "assignments" in given and dict(asked.assignments) != dict(self.assignments):
            changed.append("--set")
        if "grid" in given and not set(asked.grid) <= set(self.grid):
            changed.append(f"the grid's keys ({', '.join(sorted(set(asked.grid) - set(self.grid)))}"
                           f" not among the sweep's: {', '.join(sorted(self.grid)) or 'none'})")
        if "data_seeds" in given and (asked.data_seeds is None) != (self.data_seeds is None):
            changed.append("--data-seeds (given for one and not the other)")
        if changed:
            raise SweepError(
                f"this sweep was made with another configuration ({'; '.join(changed)} differ "
                "from its sweep.json); choose a new --out, or repeat its command (with more "
                "values or seeds to extend it)")
        grid = {k: _union(v, asked.grid.get(k, ())) if "grid" in given else v
                for k, v in self.grid.items()}
        if EPSILON_KEY in grid:  # budgets read in order, as --epsilons sorts them
            grid[EPSILON_KEY] = tuple(sorted(grid[EPSILON_KEY], key=float))
        return SweepSpec(
            grid=grid,
            seeds=_union(self.seeds, asked.seeds) if "seeds" in given else self.seeds,
            data_seeds=(_union(self.data_seeds, asked.data_seeds)
                        if "data_seeds" in given and self.data_seeds is not None
                        and asked.data_seeds is not None else self.data_seeds),
            users=self.users, assignments=self.assignments,
            reference=asked.reference if "reference" in given else self.reference)


def _union(old: Sequence, new: Sequence) -> tuple:
    return (*old, *(v for v in new if v not in old))


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
    tmp = out / (SWEEP_FILE + ".partial")
    tmp.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    tmp.replace(out / SWEEP_FILE)


def check_cells(out: Path, spec: SweepSpec) -> None:
    """Refuse a sweep whose cell directories hold runs of other configurations (a sweep.json
    edited by hand, a directory copied in): nothing is ever summarised with what it is not."""
    for cell in spec.cells():
        path = cell_dir(out, cell) / "config.json"
        if path.exists() and from_flat(json.loads(path.read_text())) != spec.config(cell):
            raise SweepError(f"{cell_dir(out, cell)} holds a run of another configuration "
                             f"than the sweep's cell {cell.name}; move it away")


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


def _number(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def grid_columns(spec: SweepSpec) -> list[str]:
    """sweep.csv's and summary.csv's columns that name a grid point: `epsilon` (every cell has
    one), then each other grid key by its dotted name."""
    return ["epsilon", *(k for k in sorted(spec.grid) if k != EPSILON_KEY)]


def cell_row(out: Path, spec: SweepSpec, cell: Cell, status: str = "done",
             error: str = "") -> dict:
    """One sweep.csv row from a cell's metrics.json (or a failure)."""
    point = dict(cell.point)
    row: dict = {"epsilon": spec.config(cell).authority.privacy.epsilon}
    row.update({k: _number(v) for k, v in point.items() if k != EPSILON_KEY})
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
    _atomic_csv(summarise(table, grid_columns(spec), spec.reference), out / SUMMARY_FILE)
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
    ref_values = {("epsilon" if k == EPSILON_KEY else k): _number(v)
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
    tmp = path.with_name(path.name + ".partial")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


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
