"""`fedscore tune`: private hyperparameter tuning whose selection is accounted (Papernot and
Steinke, ICLR 2022; the maths in server/tune_privacy.py).

    DIR/tune.json        what the tune is (grid, total epsilon, law of K, score noise, --set)
                         and its plan: the per-run epsilon, K, each run's candidate
    DIR/parties/seed=D/  the population every run trains on (one federation)
    DIR/runs/<run>/      an ordinary run directory per run (a sweep's cell: the candidate's
                         point, `data=D`, `seed=i` for the i-th run); its ledger ends with the
                         selection score's line, and tune_score.json holds the score
    DIR/tune_runs.csv    the authority's own record of every run (NOT a release: only the
                         chosen run is covered by the theorem)
    DIR/summary.json     the release: the chosen run, its noisy score, the tuned epsilon

The number of runs K and each run's candidate are drawn from the authority's secret stream
(its keystore), never from the public seed: K is data-independent, so stating it costs
nothing; only the choice of the best run spends, and that is what the theorem accounts. Each
run's accountant is RDP (the theorem composes RDP curves), and its epsilon target is the largest
whose tuned total meets --epsilon. Cells, their directories, resumption and the federation
come from the sweep (simulations/run/sweep.py): a finished run is never run again, and the
same command continues a tune.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clients.protocol.accounting import History, add_steps, joint_multiplier
from clients.protocol.schema import SILOS
from crypto.at_rest import open_keystore
from crypto.identity import keyed_refs
from crypto.private_files import write_atomic
from server import gbdt_dp, gbdt_dp_run, ledger_lines, scorecard_dp, scorecard_dp_run
from server.config import AuthorityConfig, ConfigError
from server.delta_budget import releases_outside_sgd, split_delta
from server.labels import load_labels
from server.ledger import Ledger
from server.privacy import CALIBRATION_STEPS, PrivacyPlan
from server.run_keys import authority_random
from server.run_plan import summaries_asked
from server.scores_file import PEPPER_FILE, read_scores
from server.tune_privacy import (
    TuneBudgetError,
    per_run_target,
    rdp_curve,
    tuned_epsilon,
)
from server.tune_score import NoisyScore, has_score, noisy_score, score_line
from simulations.data.paths import Parties
from simulations.run.config import ExperimentConfig, from_flat
from simulations.run.grid import Cell, point_name
from simulations.run.sweep import cell_dir, is_done, set_aside_unfinished
from simulations.run.tune_spec import (
    RUNS_FILE,
    SCORE_FILE,
    SUMMARY_FILE,
    TUNE_FILE,
    TuneError,
    TunePlan,
    TuneSpec,
)

log = logging.getLogger(__name__)

# ---- the budget ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What one run costs each population, as RDP histories (sigma, q, steps)."""

    train: History
    val: History

    def curve(self) -> np.ndarray:
        """The run's RDP curve: the larger of its two disjoint populations' (training people
        through DP-SGD, validation people through the calibration and the score)."""
        return np.maximum(rdp_curve(self.train), rdp_curve(self.val))


def planned_budget(cfg: ExperimentConfig, n_train: int, score_noise: float) -> Budget:
    """One run's spend as its authority will plan it (server/privacy.py PrivacyPlan, the same
    calibration, which leaves room for privacy.selection_noise), with the score's Gaussian on
    validation people after the calibration."""
    authority = cfg.authority
    if gbdt_dp_run.accounts_itself(authority):  # the DP trees or the DP scorecard
        return _model_budget(authority, n_train, score_noise)
    try:
        plan = PrivacyPlan(authority.privacy, SILOS, n_train, authority.train.batch_size,
                           authority.train.epochs, None, summaries_asked(authority))
    except ConfigError as exc:  # a target below what the statistics alone spend
        raise TuneBudgetError(str(exc)) from None
    train = add_steps(plan.statistics, plan.joint_sigma, plan.q, plan.steps_planned)
    val = add_steps(plan.statistics, plan.calibration_sigma, 1.0, CALIBRATION_STEPS)
    return Budget(train, add_steps(val, score_noise, 1.0, 1))


def _model_budget(authority: AuthorityConfig, n_train: int, score_noise: float) -> Budget:
    """A DP tree or DP scorecard run's spend as it will plan it (server/gbdt_dp_run.py
    `plan_budget`, whose calibration leaves room for privacy.selection_noise as PrivacyPlan's
    does): the lines it will write (the statistics, the model's release, the calibration),
    read as the finished run's ledger is read, with the score's Gaussian on validation
    people."""
    params: gbdt_dp.DpTreeParams | scorecard_dp.DpScorecardParams
    if authority.model.kind == "scorecard":
        params = scorecard_dp_run.dp_params(authority)
    else:
        params = gbdt_dp_run.dp_params(authority)
    try:
        budget = gbdt_dp_run.plan_budget(authority, SILOS, n_train, params)
    except ConfigError as exc:  # a target below what the statistics alone spend
        raise TuneBudgetError(str(exc)) from None
    spent = lines_budget([*gbdt_dp_run.statistics_lines(budget),
                          *gbdt_dp_run.release_lines(budget, calibrated=True)])
    return Budget(spent.train, add_steps(spent.val, score_noise, 1.0, 1))


def planned_people(cfg: ExperimentConfig) -> int:
    """The people a run will align: a generated population's population.users, or on real
    data (--data) the people every party's table holds (PSI keeps exactly those), counted on
    keyed hashes by the import's own inspection (simulations/data/check.py) before anything
    is written."""
    if cfg.generated:
        return cfg.population.users
    return _real_people(cfg.data)


@functools.lru_cache(maxsize=4)
def _real_people(data: str) -> int:
    """Once per data source and process: the command's checks and the plan ask alike."""
    from simulations.data.check import inspect
    from simulations.data.mapping import DataImportError, resolve_mapping

    checked = inspect(resolve_mapping(data))
    if checked.problems:  # the run's import would refuse them too, with the same messages
        raise DataImportError.of(list(checked.problems))
    if not checked.joint:
        raise TuneError(f"--data {data}: no person is held by every party; nothing to tune on")
    return checked.joint


def planned_train_people(cfg: ExperimentConfig) -> int:
    """The training people of a run (split.train of the people it aligns)."""
    return max(1, round(cfg.authority.split.train * planned_people(cfg)))


def most_train_people(cfg: ExperimentConfig) -> int:
    """An upper bound of a run's training people: the split puts each person in training
    independently (server/split.py), so their number is Binomial(people, split.train); four
    standard deviations over its mean. The default delta, 1/(10 N), planned on it stays under
    every run's own default, so no run's guardrail finds the tune's delta above 1/(10 N) (on
    UCI, planned on the mean 21,000, runs of 21,053 and 21,012 people warned)."""
    people, share = planned_people(cfg), cfg.authority.split.train
    spread = math.sqrt(people * share * (1 - share))
    return min(people, math.ceil(share * people + 4 * spread))


def plan_budget(spec: TuneSpec) -> tuple[float, float, float, int, dict[str, np.ndarray]]:
    """(per-run epsilon, planned total, delta, training people, each candidate's curve at that
    per-run epsilon). The per-run epsilon is the largest whose tuned total meets spec.epsilon;
    candidates that spend alike (only what DP ignores differs, e.g. the learning rate) are
    planned once."""
    points = spec.points()
    base = spec.sweep(1.0)
    first = base.config(spec.cells([0])[0])
    n_train = planned_train_people(first)
    privacy = first.authority.privacy
    delta = privacy.delta_for(most_train_people(first))
    # Each run's category thresholds add their delta outside RDP: over K runs at most E[K]
    # times one run's (a union bound), reserved out of the tuned model's delta.
    reserved = split_delta(delta, releases_outside_sgd(SILOS, summaries=False)).reserved
    rdp_delta = delta - spec.law.mean * reserved
    if rdp_delta <= 0:
        raise TuneError(f"delta {delta:.2e} cannot cover {spec.law.mean:g} runs' category "
                        "thresholds; lower --mean-runs or raise privacy.delta")
    cache: dict[tuple, np.ndarray] = {}

    def curves(eps_run: float) -> dict[str, np.ndarray]:
        out = {}
        sweep = spec.sweep(eps_run)
        for point in points:
            cfg = sweep.config(Cell(point, 0, spec.data_seed))
            a = cfg.authority
            key = (eps_run, a.privacy, a.train.batch_size, a.train.epochs, a.split,
                   a.aggregation.mode, a.model.kind, a.gbdt, a.scorecard)
            if key not in cache:
                cache[key] = planned_budget(cfg, n_train, spec.score_noise).curve()
            out[point_name(point)] = cache[key]
        return out

    def curve_of(eps_run: float) -> np.ndarray:
        return np.max(np.vstack(list(curves(eps_run).values())), axis=0)

    try:
        run_eps = per_run_target(spec.epsilon, rdp_delta, spec.law, curve_of)
    except TuneBudgetError as exc:
        raise TuneError(str(exc)) from None
    # The configuration holds the target in its canonical spelling: never above the plan's.
    run_eps = float(f"{run_eps:.4g}")
    chosen = curves(run_eps)
    total = tuned_epsilon(chosen.values(), spec.law, rdp_delta)
    if total > spec.epsilon:  # the rounding can only lower the target; checked all the same
        raise TuneError(f"the plan's total {total:.4g} passes --epsilon {spec.epsilon:g}")
    return run_eps, total, delta, n_train, chosen


def draw_runs(spec: TuneSpec, rng: np.random.Generator) -> tuple[int, ...]:
    """K from the law, then each run's candidate uniformly, from the authority's stream."""
    k = spec.law.draw(rng)
    n = len(spec.points())
    return tuple(int(c) for c in rng.integers(0, n, size=k))


def authority_stream(out: Path, spec: TuneSpec, nonce: str, purpose: str
                     ) -> np.random.Generator:
    """The authority's secret stream for this tune: its secret lives in the keystore of the
    tune's population (created there on first use, as a run would)."""
    cell = spec.cells([0])[0]
    parties = out / "parties" / cell.population
    store = open_keystore(spec.sweep(1.0).config(cell).authority.storage.keystore, parties)
    return authority_random(store, parties).generator("tune", purpose, nonce)


def plan_tune(out: Path, spec: TuneSpec, *,
              budget: Callable[[TuneSpec], tuple] = plan_budget,
              check: Callable[[ExperimentConfig], None] | None = None) -> TunePlan:
    """The tune in `out`: the one written there (the same options must be asked), or a new plan
    (budget, then K and the candidates from the authority's secret stream), written to
    tune.json before any run starts. `check` refuses a candidate's configuration at the
    planned per-run epsilon (delta, guardrails) before anything is written, so a refused tune
    leaves no directory behind."""
    path = out / TUNE_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        plan = TunePlan.from_json(saved)
        if plan.spec.to_json() != spec.to_json():
            changed = sorted(k for k, v in spec.to_json().items()
                             if plan.spec.to_json().get(k) != v)
            raise TuneError(f"{out} holds a tune with other options ({', '.join(changed)} "
                            "differ from its tune.json); repeat its command or choose a new "
                            "--out")
        return plan
    if out.exists() and any(out.iterdir()):
        raise TuneError(f"{out} holds files but no {TUNE_FILE}; choose a new --out")
    run_eps, total, delta, n_train, curves = budget(spec)
    if check is not None:
        sweep = spec.sweep(run_eps, delta)
        for point in spec.points():
            check(sweep.config(Cell(point, 0, spec.data_seed)))
    nonce = secrets.token_hex(16)
    runs = draw_runs(spec, authority_stream(out, spec, nonce, "runs"))
    plan = TunePlan(spec, run_eps, total, delta, n_train, runs, nonce,
                    {k: [float(x) for x in v] for k, v in curves.items()})
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(plan.to_json(), indent=2) + "\n", public=True)
    return plan


# ---- scoring, selection, the total ---------------------------------------------------------


def score_run(plan: TunePlan, out: Path, cell: Cell) -> NoisyScore:
    """The authority's noisy validation loss of a finished run: released once on its ledger
    (a rerun draws the same noise from the same keyed stream and writes no second line)."""
    run_dir = cell_dir(out, cell)
    saved = run_dir / SCORE_FILE
    if saved.exists():
        return NoisyScore(**json.loads(saved.read_text()))
    cfg = plan.config(cell)
    parties = Parties(out / "parties" / cell.population)
    store = open_keystore(cfg.authority.storage.keystore, parties.root)
    authority = json.loads((run_dir / "authority.json").read_text())
    scores = read_scores(run_dir, store.path if store else None, with_split=True)
    ids, labels = load_labels(parties.party("authority"), store)
    pepper = parties.party("authority").joinpath(PEPPER_FILE).read_bytes()
    refs = keyed_refs(ids.to_numpy(), pepper, authority["subject_ref"].removeprefix("hmac-"))
    rows = pd.Index(refs).get_indexer(scores["subject_ref"])
    val = (scores["split"].astype(str) == "val").to_numpy() & scores["probability"].notna() \
        .to_numpy()
    if (rows[val] < 0).any():
        raise TuneError(f"{run_dir}: its scores name people the authority's table does not "
                        "hold; was the population replaced?")
    y = labels[rows[val]].astype(float)
    rng = authority_random(store, parties.root).generator(
        "tune-score", authority["model"]["run_key"])
    score = noisy_score(scores["probability"].to_numpy()[val], y, rng, plan.spec.score_noise)
    lines = ledger_lines.read(run_dir)
    if not has_score(lines):
        Ledger(run_dir).append(score_line(
            lines, plan.spec.score_noise, authority["accountant"],
            authority["delta_accountant"], authority["delta"],
            max((x.round for x in lines), default=0)))
    write_atomic(saved, json.dumps({"loss_sum": score.loss_sum, "people": score.people,
                                    "noise_multiplier": score.noise_multiplier}) + "\n",
                 public=True)
    return score


def ledger_budget(run_dir: Path) -> Budget:
    """A finished run's spend per population, from its ledger (the score's line included)."""
    return lines_budget(ledger_lines.read(run_dir))


def lines_budget(lines: Sequence[ledger_lines.LedgerLine]) -> Budget:
    """The spend per population of a run's ledger lines (model budget): training people
    through lines of population all/train, validation people through all/val."""
    train: History = []
    val: History = []
    for line in lines:
        if line.budget != "model":
            continue
        if isinstance(line, ledger_lines.JointRound):
            sigma = joint_multiplier([b.noise_multiplier for b in line.blocks])
            train = add_steps(train, sigma, line.sample_rate, line.steps)
        elif isinstance(line, ledger_lines.GaussianRelease):
            entry = (line.noise_multiplier, line.sample_rate, line.steps)
            if line.population in ("all", "train"):
                train = add_steps(train, *entry)
            if line.population in ("all", "val"):
                val = add_steps(val, *entry)
    return Budget(train, val)


def select(scores: Mapping[str, NoisyScore]) -> str:
    """The run with the lowest noisy mean validation loss (ties: the earlier run)."""
    if not scores:
        raise TuneError("no run of the tune finished; nothing to select")
    return min(scores, key=lambda name: scores[name].mean_loss)


def accounted_total(plan: TunePlan, budgets: Sequence[Budget]) -> float:
    """The tuned epsilon from the runs' own ledgers, with the planned curves of candidates no
    run drew (the theorem's base algorithm could have drawn them)."""
    drawn = {point_name(c.point) for c in plan.cells()}
    curves = [b.curve() for b in budgets]
    curves += [np.asarray(v) for k, v in plan.curves.items() if k not in drawn]
    reserved = split_delta(plan.delta, releases_outside_sgd(SILOS, summaries=False)).reserved
    return tuned_epsilon(curves, plan.spec.law, plan.delta - plan.spec.law.mean * reserved)


def summarise(plan: TunePlan, out: Path, scores: Mapping[str, NoisyScore],
              failures: Mapping[str, str]) -> dict:
    """tune_runs.csv (the authority's record) and, once every run finished, summary.json."""
    rows = []
    for cell in plan.cells():
        row: dict[str, Any] = {"run": cell.name, "candidate": cell.point_name}
        row.update(dict(cell.point))
        if cell.name in scores:
            metrics = json.loads((cell_dir(out, cell) / "metrics.json").read_text())
            row.update(status="done", noisy_val_loss=scores[cell.name].mean_loss,
                       test_auc=metrics.get("auc"),
                       run_epsilon=(metrics.get("epsilon") or {}).get("model"))
        else:
            row.update(status="failed" if cell.name in failures else "to run",
                       error=failures.get(cell.name, ""))
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run", "candidate", "status"] if not rows else None)
    write_atomic(out / RUNS_FILE, table.to_csv(index=False), public=True)
    if len(scores) < plan.k:
        return {}
    if plan.k == 0:  # a Poisson draw of no run: nothing is released, nothing is spent
        total = accounted_total(plan, [])  # the theorem's bound holds whatever K came out
        return _write_summary(out, {
            "chosen": None, "runs": {"k": 0, "law": plan.spec.law.describe()},
            "epsilon": {"total": total, "asked": plan.spec.epsilon},
            "within_budget": total <= plan.spec.epsilon * (1 + 1e-9)})
    best = select(scores)
    (cell,) = [c for c in plan.cells() if c.name == best]
    total = accounted_total(plan, [ledger_budget(cell_dir(out, c)) for c in plan.cells()])
    metrics = json.loads((cell_dir(out, cell) / "metrics.json").read_text())
    label_eps = (metrics.get("epsilon") or {}).get("label")
    summary = {
        "chosen": {"run": best, "candidate": dict(cell.point),
                   "noisy_val_loss": scores[best].mean_loss,
                   "score_noise_std": scores[best].noise_std_mean,
                   "test_auc": metrics.get("auc"), "directory": str(cell_dir(out, cell))},
        "epsilon": {
            "total": total, "asked": plan.spec.epsilon, "planned_total": plan.planned_total,
            "per_run_target": plan.run_epsilon, "delta": plan.delta,
            "accountant": "rdp",
            "theorem": ("Papernot & Steinke, ICLR 2022 (arXiv:2110.03620v2), "
                        + ("Theorem 6 (Poisson)" if plan.spec.law.poisson
                           else "Theorem 2 (truncated negative binomial)")),
            # The silos see every run's randomised labels: label DP composes over the K runs.
            "label_against_silos": None if label_eps is None else plan.k * label_eps,
        },
        "runs": {"k": plan.k, "law": plan.spec.law.describe(),
                 "drawn_from": "the authority's secret stream (keystore), not the seed"},
        "within_budget": total <= plan.spec.epsilon * (1 + 1e-9),
    }
    return _write_summary(out, summary)


def _write_summary(out: Path, summary: dict) -> dict:
    write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n", public=True)
    return summary


def run_tune(out: Path, plan: TunePlan, on_cell=None, progress=None) -> dict:
    """Run every unfinished run of the plan in one federation, score them, select, write
    tune_runs.csv and summary.json; returns the summary ({} when runs failed)."""
    from simulations.run.experiment import run_cells  # the engine is heavy: import when running

    cells = plan.cells()
    for cell in cells:  # a directory of another configuration is never taken for a run
        path = cell_dir(out, cell) / "config.json"
        if path.exists() and from_flat(json.loads(path.read_text())) != plan.config(cell):
            raise TuneError(f"{cell_dir(out, cell)} holds a run of another configuration "
                            f"than the tune's run {cell.name}; move it away")
    todo = [c for c in cells if not is_done(out, c)]
    failures: dict[str, str] = {}
    if todo:  # every run trains on one population: one federation
        resumes = {c.name: set_aside_unfinished(out, c) for c in todo}

        def on_done(i: int, err: str) -> None:
            if on_cell:
                on_cell(err or "done", todo[i])

        outcomes = run_cells([(plan.config(c), cell_dir(out, c), resumes[c.name]) for c in todo],
                             out / "parties" / cells[0].population, progress=progress,
                             on_done=on_done)
        failures = {c.name: e for c, e in zip(todo, outcomes, strict=True) if e}
    scores = {c.name: score_run(plan, out, c) for c in cells if is_done(out, c)}
    return summarise(plan, out, scores, failures)

