"""What a `fedscore tune` is and what its plan fixed (simulations/run/tune.py runs it): the
files of a tune directory, the keys the tune sets itself, the spec the options ask for and the
plan written once, so that a continued tune is the same tune."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from server.tune_privacy import RunsLaw
from simulations.data.paths import EPSILON_KEY
from simulations.run.config import DATA_KEY, ExperimentConfig
from simulations.run.grid import Cell, SweepError, SweepSpec, canonical

TUNE_FILE = "tune.json"
RUNS_FILE = "tune_runs.csv"
SUMMARY_FILE = "summary.json"
SCORE_FILE = "tune_score.json"
ACCOUNTANT_KEY = "privacy.accountant"
DELTA_KEY = "privacy.delta"
SELECTION_KEY = "privacy.selection_noise"
DEFAULT_SCORE_NOISE = 5.0
DEFAULT_MEAN_RUNS = 3.0
# The vertical models whose runs account their releases in RDP curves the tune composes: the
# MLP's DP-SGD (server/privacy.py), the DP trees and the DP scorecard (server/gbdt_dp_run.py).
TUNED_KINDS = ("mlp", "gbdt", "scorecard")
# Keys the tune sets itself, and why they cannot be given.
OWN_KEYS = {
    EPSILON_KEY: "the tune sets each run's epsilon so the TOTAL meets --epsilon",
    ACCOUNTANT_KEY: "the tune accounts every run in RDP (the theorem composes RDP curves)",
    SELECTION_KEY: "the tune sets it from --score-noise",
}


class TuneError(SweepError):
    """A tune that cannot run as asked; nothing was changed."""


@dataclass(frozen=True, kw_only=True)
class TuneSpec:
    """What the user asks: candidates (`grid`), the tuned model's total epsilon, how many runs
    (`law`), the score's noise multiplier, and the sweep's other settings."""

    grid: Mapping[str, Sequence[Any]]
    epsilon: float
    law: RunsLaw
    score_noise: float = DEFAULT_SCORE_NOISE
    users: int | None = None
    data_seed: int = 0
    assignments: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise TuneError(f"--epsilon {self.epsilon:g}: the tuned model's total epsilon must "
                            "be a finite number > 0 (to pick among non-private runs, use "
                            "`fedscore sweep` and its validation AUC)")
        if not (math.isfinite(self.score_noise) and self.score_noise > 0):
            raise TuneError(f"--score-noise {self.score_noise:g}: the score's noise multiplier "
                            "must be a finite number > 0")
        if self.data_seed < 0:
            raise TuneError("--data-seed: a whole number >= 0")
        for key, why in OWN_KEYS.items():
            if key in self.grid:
                raise TuneError(f"--grid {key}: {why}")
            if key in dict(self.assignments):
                raise TuneError(f"--set {key}: {why}")
        if not self.grid:
            raise TuneError("--grid: name the candidates, e.g. --grid train.lr=0.01,0.03")
        cfg = self._unit.config(self.cells([0])[0])  # every key and value checked
        authority = cfg.authority
        if not cfg.generated and self.data_seed:
            raise TuneError("--data-seed: real data (--data) has one population; leave "
                            "--data-seed at 0")
        if authority.topology != "vertical":
            raise TuneError(
                "a tune accounts vertical runs only (topology=vertical): in a horizontal run the "
                "labels stay with the regions, so the authority holds no validation labels to "
                "score a run on (the score would be one more release of the regions' own, "
                "outside their accountants), and the regions' per-region DP-SGD or user-level "
                "ledgers are not the RDP curves the selection theorem composes")
        if authority.model.kind not in TUNED_KINDS:
            raise TuneError(f"model.kind={authority.model.kind}: a tune accounts "
                            f"{', '.join(TUNED_KINDS)} runs")
        if authority.storage.keystore == "none":
            raise TuneError("storage.keystore=none: the tune draws its runs from the "
                            "authority's secret in its keystore; leave storage.keystore at auto"
                            " or name one")

    def sweep(self, run_epsilon: float, delta: float | None = None) -> SweepSpec:
        """The candidates as a sweep's grid, each run at `run_epsilon` accounted in RDP; with
        `delta`, each run composes at it unless --set privacy.delta named one (a run would
        otherwise take 1/(10 N) of its own N, which the plan can only estimate)."""
        own: tuple[tuple[str, str], ...] = (
            (EPSILON_KEY, canonical(float(run_epsilon))), (ACCOUNTANT_KEY, "rdp"),
            (SELECTION_KEY, canonical(float(self.score_noise))))
        if delta is not None and DELTA_KEY not in dict(self.assignments):
            own += ((DELTA_KEY, canonical(float(delta))),)
        # Real data has one population (no data seeds: the sweep refuses them with --data);
        # the tune's cells still name data seed 0, so every run shares DIR/parties/seed=0.
        data_seeds = (self.data_seed,) if not self.real_data else None
        return SweepSpec(grid=self.grid, seeds=(0,), data_seeds=data_seeds,
                         users=self.users, assignments=tuple(sorted((*self.assignments, *own))))

    @property
    def real_data(self) -> bool:
        """--data: the runs import real tables instead of generating people."""
        return bool(dict(self.assignments).get(DATA_KEY))

    @cached_property
    def _unit(self) -> SweepSpec:
        """The candidates at a placeholder epsilon: what does not depend on the budget."""
        return self.sweep(1.0)

    def points(self) -> list[tuple[tuple[str, str], ...]]:
        return self._unit.points()

    def cells(self, choices: Sequence[int]) -> list[Cell]:
        """Run i trains candidate choices[i] with training seed i, on the tune's population."""
        points = self.points()
        return [Cell(points[c], i, self.data_seed) for i, c in enumerate(choices)]

    def to_json(self) -> dict:
        return {"grid": {k: list(v) for k, v in self._unit.grid.items()},
                "epsilon": self.epsilon,
                "law": {"distribution": self.law.distribution, "mean": self.law.mean,
                        "shape": self.law.shape},
                "score_noise": self.score_noise, "users": self.users,
                "data_seed": self.data_seed, "assignments": dict(self.assignments)}

    @classmethod
    def from_json(cls, saved: dict) -> TuneSpec:
        return cls(grid=saved["grid"], epsilon=float(saved["epsilon"]),
                   law=RunsLaw(**saved["law"]), score_noise=float(saved["score_noise"]),
                   users=saved["users"], data_seed=int(saved["data_seed"]),
                   assignments=tuple(sorted(saved["assignments"].items())))


@dataclass(frozen=True)
class TunePlan:
    """The budget and the draws: fixed once written, so a continued tune is the same tune."""

    spec: TuneSpec
    run_epsilon: float  # each run's epsilon target (its RDP accountant's)
    planned_total: float  # the tuned epsilon the plan expects
    delta: float  # the tuned model's delta (the configured delta of one run)
    n_train: int  # training people the plan assumed
    runs: tuple[int, ...]  # the candidate of each run (K = len(runs))
    nonce: str  # addresses the authority's draws for this tune
    curves: dict[str, list[float]] = field(default_factory=dict)  # per candidate, planned

    @property
    def k(self) -> int:
        return len(self.runs)

    def cells(self) -> list[Cell]:
        return self.spec.cells(self.runs)

    def config(self, cell: Cell) -> ExperimentConfig:
        return self.spec.sweep(self.run_epsilon, self.delta).config(cell)

    def to_json(self) -> dict:
        return {**self.spec.to_json(), "plan": {
            "run_epsilon": self.run_epsilon, "planned_total": self.planned_total,
            "delta": self.delta, "n_train": self.n_train, "runs": list(self.runs),
            "k": self.k, "nonce": self.nonce, "curves": self.curves}}

    @classmethod
    def from_json(cls, saved: dict) -> TunePlan:
        plan = saved["plan"]
        return cls(TuneSpec.from_json(saved), float(plan["run_epsilon"]),
                   float(plan["planned_total"]), float(plan["delta"]), int(plan["n_train"]),
                   tuple(plan["runs"]), plan["nonce"], plan.get("curves", {}))
