"""What a sweep is: a grid of config values, training seeds and data seeds, and its cells.

A grid value is written one way everywhere (sweep.json, cell names, sweep.csv): `canonical`.
A cell's name is its grid point (keys sorted, privacy.epsilon written `eps`), then `data=D`
when the sweep has its own data seeds, then `seed=S`: `eps=1_seed=0`,
`eps=1_train.lr=0.003_data=0_seed=2`. `seed` is the training seed (initialisation; DP noise and
batches come from the keystores); `data_seed` is population.seed. Without data seeds each cell's
population is the one of its training seed, as in a single `fedscore run --seed S`.
Running a sweep and its results: simulations/run/sweep.py.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.config import ConfigError
from server.config_keys import coerce, unknown_key_error
from simulations.data.paths import EPSILON_KEY
from simulations.run.config import (
    DATA_KEY,
    POPULATION_PREFIX,
    ExperimentConfig,
    known_keys,
    make_config,
)

DEFAULT_EPSILONS = "0.5,1,2,4,8,inf"

# Keys a grid cannot vary, and what to use instead: the cells of one population share one
# federation (one topology, one data source, one keystore), and seeds have options of their own.
NOT_SWEPT = {
    "seed": "use --seeds (training seeds)",
    "population.seed": "use --data-seeds",
    "topology": "sweep one topology per sweep and put two sweeps side by side with "
                "`fedscore compare`",
    DATA_KEY: "use --data; one data source per sweep",
    # The silos' operators enrol once per population for what the experiment asks (their
    # policy: reason codes, aggregation, secure sum); one federation cannot admit two of them.
    "explain.reasons": "silos admit one reason-code setting per federation; run one sweep per "
                       "setting and put them side by side with `fedscore compare`",
    "aggregation.mode": "silos admit one aggregation per federation; run one sweep per mode "
                        "and put them side by side with `fedscore compare`",
    "aggregation.secure": "silos admit one secure-sum setting per federation; run one sweep "
                          "per setting and put them side by side with `fedscore compare`",
}
# Keys that shape the parties' tables: cells with different values need their own population.
POPULATION_KEYS = ("regions",)
NOT_SWEPT_PREFIXES = ("storage.",)

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
        varied = [f"{k}={v}" for k, v in self.point
                  if k.startswith(POPULATION_PREFIX) or k in POPULATION_KEYS]
        return "_".join([f"seed={self.population_seed}", *varied])


def point_name(point: Iterable[tuple[str, str]]) -> str:
    return "_".join(f"{'eps' if k == EPSILON_KEY else k}={v}" for k, v in point)


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A sweep: every combination of the grid's values, for each data seed and training seed.

    grid: {config key: values} (`--grid`, `--epsilons`); values as numbers or strings.
    seeds: training seeds. data_seeds: population seeds, or None for each cell's training seed.
    reference: the values of the reference point that were asked for (`--reference`); the
    point paired differences are taken against is `reference_point`, where the keys not asked
    for take privacy.epsilon's largest value (inf: the non-private run) and each other key's
    first, in the grid as it is now (an extended sweep's default follows its new values).
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
        if self.data_seeds is not None and DATA_KEY in dict(self.assignments):
            # population.seed draws generated people; on real data cells would differ only in
            # name and pass for independent replicates.
            raise SweepError("--data-seeds: real data (--data) has one population; vary "
                             "--seeds instead")
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
        return given

    @property
    def reference_point(self) -> dict[str, str]:
        """The grid point paired differences are taken against (see the class docstring)."""
        default = {k: (max(v, key=float) if k == EPSILON_KEY else v[0])
                   for k, v in self.grid.items()}
        return {k: self.reference.get(k, default[k]) for k in sorted(self.grid)}

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
