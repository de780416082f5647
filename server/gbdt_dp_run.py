"""The DP trees in `fedscore run` (`model.kind=gbdt` at a finite privacy.epsilon; the trees
themselves are server/gbdt_dp.py's totally random trees with noisy Newton leaves).

Messages. `query.gbdt_start` as for the SecureBoost trees (run key, bins, training positions:
each silo's column count), then ONE `query.gbdt_route` per silo, all silos at once: the
authority has drawn every tree's structure (silo, column, bin per node) from its secret stream
("dp-trees", run key, "structure") before reading any label or table, so it asks each silo for
its left/right bit at each of its (column, bin) pairs for EVERY aligned person, bit-packed along
the people. Those bits place everyone in a leaf of every tree: the authority boosts on the
training people's leaves (`gbdt_dp.boost`) and scores everyone from the same leaves, so there
is no second routing and a run costs two round trips. The silos bin their prepared matrix
divided by DP_UNITS, which query.gbdt_start names (the SecureBoost trees: STANDARD_UNITS;
clients/protocol/gbdt.py says why they differ).

Privacy. The silos receive the training positions and their own (column, bin) pairs, drawn
independently of every label and table: nothing label-dependent, so no randomised response is
drawn (privacy.label_epsilon is not spent; eps_label is reported as None). eps_model covers
what is released, per population as the MLP run does: training people through the silos'
preparation statistics (their ledger lines are written here, as PrivacyPlan writes them for
an MLP run), the trees' noisy prior and the trees' leaf sums (`DpTreesRelease.ledger_lines`);
validation people through the same statistics and the DP Platt calibration of the MLP run
(server/scoring.py `fit_private`, its noise calibrated to the same target). No prior of the
run's own is released (the trees' is the one), and no per-silo contribution summary: exact
quantiles over people would need DP summaries of their own, so `contributions` stays empty.
delta is the MLP run's: the configured one less the silos' category thresholds' reservation,
at which every epsilon is composed.

The authority learns what server/gbdt_dp.py says: every person's leaf in every tree. The
DP-SGD machinery of the run (its PrivacyPlan, randomised response, prior) is turned off for
these runs (`sgd_config`): the trees account for themselves.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar, overload

import numpy as np

from clients.protocol.accounting import History, add_steps, calibrate_sigma, epsilon
from clients.protocol.gbdt import DP_UNITS
from crypto.secret_random import SecretRandom
from server import gbdt_dp, gbdt_dp_guide, gbdt_dp_init, gbdt_run, run_phases, scorecard_dp, scoring
from server.checkpoint import RunState
from server.config import AuthorityConfig, ConfigError
from server.delta_budget import DeltaSplit, OutsideRelease, releases_outside_sgd, split_delta
from server.federation import Federation
from server.gbdt import Model
from server.gbdt_boost import depth_of, shared_settings
from server.gbdt_reasons import (
    Credits,
    ExplainedSilos,
    FeatureNames,
    consent_and_names,
    dp_credits,
    dp_values,
    settle,
)
from server.gbdt_run import TreeJob
from server.gbdt_scores import HISTORY_POINTS, history_row
from server.gbdt_silos import FlowerSilos, start
from server.kept_model import tree_record, unsupported_record
from server.ledger import Ledger
from server.ledger_lines import GaussianRelease
from server.privacy import AUTHORITY, CALIBRATION_STEPS
from server.split import Split
from server.training import TrainResult

log = logging.getLogger(__name__)


def dp_trees(cfg: AuthorityConfig) -> bool:
    """Whether the run trains the DP trees."""
    return cfg.model.kind == "gbdt" and cfg.privacy.dp_sgd


def accounts_itself(cfg: AuthorityConfig) -> bool:
    """Whether the run's model accounts for its own releases: the DP trees, and the DP
    scorecard (server/scorecard_dp_run.py), which uses this module's budget and lines."""
    return cfg.model.kind in ("gbdt", "scorecard") and cfg.privacy.dp_sgd


def sgd_config(cfg: AuthorityConfig) -> AuthorityConfig:
    """What the run's DP-SGD machinery (randomised response, the run's prior, PrivacyPlan)
    sees: for a model that accounts for itself nothing to do (epsilon and label epsilon inf);
    else `cfg`."""
    if not accounts_itself(cfg):
        return cfg
    return replace(cfg, privacy=replace(cfg.privacy, epsilon=math.inf,
                                        label_epsilon=math.inf, cap=0.0))


def dp_params(cfg: AuthorityConfig) -> gbdt_dp.DpTreeParams:
    g = cfg.gbdt
    trees, lr, reg_lambda = shared_settings(cfg)
    return gbdt_dp.DpTreeParams(
        trees=trees, depth=depth_of(cfg), bins=g.bins, lr=lr, lambda_=reg_lambda,
        sample_rate=g.sample_rate, batch=g.batch, hessian_noise=g.hessian_noise,
        max_leaf=g.max_leaf, guide_every=g.guide_every, guide_sigma=g.guide_sigma,
        guide_beta=g.guide_beta, guide_mix=g.guide_mix, guide_stat=g.guide_stat,
        guide_bins=g.guide_bins, guide_share=g.guide_share, leaf_rule=g.leaf_rule,
        hs_kappa=g.hs_kappa, eb_decay=g.eb_decay, reuse=g.reuse,
        accountant=cfg.privacy.accountant)


def init_params(cfg: AuthorityConfig) -> gbdt_dp_init.InitParams | None:
    """The first additive stage's settings (server/gbdt_dp_init.py); None without one."""
    if cfg.gbdt.init == "none":
        return None
    card = scorecard_dp.DpScorecardParams(accountant=cfg.privacy.accountant)
    return gbdt_dp_init.InitParams(share=cfg.gbdt.init_share, card=card)


class Release(Protocol):
    """A model's own DP mechanism on the training people (`gbdt_dp.DpTreesRelease`,
    `scorecard_dp.DpScorecardRelease`): what the budget, the ledger and the summary read."""

    @property
    def epsilon(self) -> float: ...

    @property
    def noise_multiplier(self) -> float: ...

    @property
    def sample_rate(self) -> float: ...

    @property
    def steps(self) -> int: ...

    def ledger_lines(self, round_: int = 0) -> list[GaussianRelease]: ...


R = TypeVar("R", bound=Release)


@dataclass(frozen=True)
class Budget(Generic[R]):
    """The run's mechanisms, planned before any data is read: the silos' preparation
    statistics (the prefix of both populations), the delta split, the model's release (the
    trees' or the scorecard's) and the calibration's noise."""

    accountant: str
    target: float
    statistics: tuple[OutsideRelease, ...]
    deltas: DeltaSplit
    release: R
    calibration_sigma: float

    def calibration_epsilon(self) -> float:
        history = add_steps(statistics_history(self.statistics), self.calibration_sigma, 1.0,
                            CALIBRATION_STEPS)
        return epsilon(self.accountant, history, self.deltas.accountant)


def statistics_history(statistics: tuple[OutsideRelease, ...]) -> History:
    history: History = []
    for r in statistics:
        history = add_steps(history, r.noise_multiplier, 1.0, 1)
    return history


@overload
def plan_budget(cfg: AuthorityConfig, silos: tuple[str, ...], n_train: int,
                params: gbdt_dp.DpTreeParams, init: None = None
                ) -> Budget[gbdt_dp.DpTreesRelease]: ...


@overload
def plan_budget(cfg: AuthorityConfig, silos: tuple[str, ...], n_train: int,
                params: gbdt_dp.DpTreeParams, init: gbdt_dp_init.InitParams
                ) -> Budget[gbdt_dp_init.InitTreesRelease]: ...


@overload
def plan_budget(cfg: AuthorityConfig, silos: tuple[str, ...], n_train: int,
                params: scorecard_dp.DpScorecardParams, init: None = None
                ) -> Budget[scorecard_dp.DpScorecardRelease]: ...


def plan_budget(cfg: AuthorityConfig, silos: tuple[str, ...], n_train: int,
                params: gbdt_dp.DpTreeParams | scorecard_dp.DpScorecardParams,
                init: gbdt_dp_init.InitParams | None = None) -> Budget[Any]:
    """Calibrate the model (the trees, or the scorecard for its params; the trees after their
    first additive stage with `init`) and the calibration to min(epsilon, cap) at the
    accountant's delta (the configured delta less the silos' thresholds)."""
    privacy = cfg.privacy
    statistics = tuple(r for r in releases_outside_sgd(silos, summaries=False)
                       if r.party != AUTHORITY)
    deltas = split_delta(privacy.delta_for(n_train), list(statistics))
    target = min(privacy.epsilon, privacy.budget_cap)
    prefix = statistics_history(statistics)
    card = isinstance(params, scorecard_dp.DpScorecardParams)
    try:
        release: Release
        if isinstance(params, scorecard_dp.DpScorecardParams):
            release = scorecard_dp.plan_noise(params, epsilon_=target, delta=deltas.accountant,
                                              prefix=prefix)
        elif init is not None:
            release = gbdt_dp_init.plan_noise(params, init, epsilon_=target,
                                              delta=deltas.accountant, prefix=prefix)
        else:
            release = gbdt_dp.plan_noise(params, epsilon_=target, delta=deltas.accountant,
                                         prefix=prefix)
        # A tune's run (privacy.selection_noise) releases a noisy validation score after
        # the calibration, on the same people: the calibration leaves it room, as
        # PrivacyPlan's does for the MLP, so the run's validation epsilon stays in its target.
        before = (add_steps(prefix, privacy.selection_noise, 1.0, 1)
                  if privacy.selection_noise else prefix)
        sigma = calibrate_sigma(target, deltas.accountant, 1.0, CALIBRATION_STEPS,
                                privacy.accountant, prefix=before)
    except ValueError as exc:
        model = "the DP scorecard" if card else "the DP trees"
        raise ConfigError(f"privacy.epsilon={privacy.epsilon} is too small for {model}: "
                          f"{exc}; raise it") from None
    return Budget(privacy.accountant, target, statistics, deltas, release, sigma)


def statistics_lines(budget: Budget[Any]) -> list[GaussianRelease]:
    """Each silo's preparation statistics, as PrivacyPlan.record_start writes them for an MLP
    run (`extra_delta`: its category thresholds): released before training."""
    lines, extra = [], 0.0
    history: History = []
    delta = budget.deltas.accountant
    for r in budget.statistics:
        history = add_steps(history, r.noise_multiplier, 1.0, 1)
        extra += r.extra_delta
        lines.append(GaussianRelease(
            party=r.party, population="all", purpose=r.purpose,
            noise_multiplier=r.noise_multiplier, sample_rate=1.0, steps=1, round=0,
            epsilon=epsilon(budget.accountant, history, delta), delta=delta + extra,
            extra_delta=r.extra_delta or None, accountant=budget.accountant))
    return lines


def release_lines(budget: Budget[Any], calibrated: bool) -> list[GaussianRelease]:
    """After the statistics: the trees' prior and leaf sums (training people) and, when it
    ran, the calibration (validation people), each claiming the combined delta."""
    combined = budget.deltas.combined
    lines = [replace(line, delta=combined) for line in budget.release.ledger_lines()]
    if calibrated:
        lines.append(GaussianRelease(
            party=AUTHORITY, population="val", purpose="calibration",
            noise_multiplier=budget.calibration_sigma, sample_rate=1.0,
            steps=CALIBRATION_STEPS, round=0, epsilon=budget.calibration_epsilon(),
            delta=combined, accountant=budget.accountant))
    return lines


def route_everyone(silos: FlowerSilos, structure: list[dict[int, gbdt_dp.Split]],
                   rows: int, depth: int) -> np.ndarray:
    """(trees, rows) leaf of every routed person: ONE route message per silo, all at once."""
    owned, asked = gbdt_dp.route_requests(list(silos), structure)
    replies = silos.route_all(asked)
    return gbdt_dp.leaves_from(owned, replies, len(structure), rows, depth)


def guided(silos: FlowerSilos, params: gbdt_dp.DpTreeParams, budget: Budget, y: np.ndarray,
           train: np.ndarray, random: SecretRandom, key: str
           ) -> tuple[gbdt_dp.DpTrees, np.ndarray]:
    """The guided trees: ONE route message per silo for all its (column, bin) pairs over every
    routed person (their bins), boosting on the training people's bins, and everyone's leaf in
    every tree computed by the authority from the same bins (no second routing)."""
    asked = {name: gbdt_dp_guide.bins_request(count, params.bins)
             for name, count in silos.features.items() if count}
    binned = gbdt_dp_guide.binned_from(
        {name: count for name, count in silos.features.items() if count},
        silos.route_all(asked), params.bins)
    trees = gbdt_dp_guide.boost_guided(binned.rows(train), y[train], params, budget.release,
                                       random, purpose=key)
    structure = [tree.splits for tree in trees.model.trees]
    return trees, gbdt_dp_guide.leaves_of(structure, binned, params.depth)


def margins(model: Model, leaf: np.ndarray, val: np.ndarray, y: np.ndarray,
            start: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """Everyone's margin from their leaves (what `gbdt.predict_trees` computes from the
    silos' bits), with validation AUC at HISTORY_POINTS tree counts (y: clean labels);
    `start`: everyone's margin from a first stage, added to the base margin."""
    offset = 2**model.params.depth - 1
    margin = np.full(leaf.shape[1], model.base_margin)
    if start is not None:
        margin = margin + start
    every = max(1, len(model.trees) // HISTORY_POINTS)
    history, t0 = [], time.perf_counter()
    for t, tree in enumerate(model.trees):
        values = np.array([tree.leaves[offset + i] for i in range(len(tree.leaves))])
        margin += values[leaf[t]]
        if (t + 1) % every == 0 or t + 1 == len(model.trees):
            history.append(history_row(margin[val], y[val], t + 1, t0))
    return margin, history


def calibration(z_val: np.ndarray, y_val: np.ndarray, budget: Budget[Any], expected_n: float,
                rng: np.random.Generator) -> scoring.Platt | None:
    """The MLP run's DP Platt fit on validation people (None when too few people make it
    not worth its noise: the trees' own probabilities are used, nothing released)."""
    if not scoring.Platt.private_fit_pays(budget.calibration_sigma, expected_n):
        log.warning("too few validation people (about %d) for a private calibration at this "
                    "epsilon: the model's own probabilities are used", expected_n)
        return None
    return scoring.Platt.fit_private(z_val, y_val, noise_multiplier=budget.calibration_sigma,
                                     steps=CALIBRATION_STEPS, expected_n=expected_n, rng=rng)


def train_trees(fed: Federation, cfg: AuthorityConfig, run: RunState, split: Split,
                y: np.ndarray, phases: run_phases.PhaseTimer, ledger: Ledger,
                random: SecretRandom, reasons: int = 0
                ) -> tuple[TrainResult, scoring.Platt, dict]:
    """A tree run's training and calibration: the DP trees at a finite epsilon, else the
    SecureBoost trees (server/gbdt_run.py, whose privacy the idle PrivacyPlan reports); with
    `reasons` > 0, everyone's reason codes (server/gbdt_reasons.py)."""
    job = TreeJob(fed, cfg, run.run_key, split.train, split.val, len(run.authority_rows), y,
                  run.y_view)
    if dp_trees(cfg):
        return train_and_calibrate(job, phases, ledger, random, reasons)
    return (*gbdt_run.train_and_calibrate(job, phases, reasons), {})


def train_and_calibrate(job: TreeJob, phases: run_phases.PhaseTimer, ledger: Ledger,
                        random: SecretRandom, reasons: int = 0
                        ) -> tuple[TrainResult, scoring.Platt, dict]:
    """Plan, route everyone once, boost on the training people, then (timed as `score`) score
    and calibrate; the ledger's lines; what the run reports of its privacy (to overwrite the
    idle PrivacyPlan's summary). Reason codes (`reasons` > 0, after the silos' consent) are
    post-processing of the released trees and each person's own leaves: no ledger line."""
    cfg, key = job.cfg, job.run_key
    params, init = dp_params(cfg), init_params(cfg)
    if init is not None:  # a first additive stage
        return train_staged(job, phases, ledger, random, reasons, params, init)
    budget = plan_budget(cfg, tuple(job.fed.silos), len(job.train), params)
    for line in statistics_lines(budget):
        ledger.append(line)
    features = start(job.fed, key, params.bins, job.train, units=DP_UNITS)
    silos = ExplainedSilos(job.fed, features,
                           route_positions=np.arange(job.n_positions, dtype=np.int64))
    names = consent_and_names(silos, reasons, job.cfg.explain.reasons > 0)
    t0 = time.perf_counter()
    y = job.y.astype(np.float64)
    if params.guide_every:
        trees, leaf = guided(silos, params, budget, y, job.train, random, key)
    else:
        structure = gbdt_dp.draw_structure(
            silos, params, random.generator(gbdt_dp.PURPOSE, key, "structure"))
        leaf = route_everyone(silos, structure, job.n_positions, params.depth)
        trees = gbdt_dp.boost(leaf[:, job.train], y[job.train], structure, params,
                              budget.release, random, purpose=key)
        leaf = trees.leaves(leaf)  # each tree's routed structure (reuse repeats some)
    log.info("%d DP trees in %.1f s, %d round trips", params.trees, time.perf_counter() - t0,
             silos.round_trips + 1)
    phases.start("score")
    margin, history = margins(trees.model, leaf, job.val, y)
    platt = calibration(margin[job.val], y[job.val], budget, job.n_positions * cfg.split.val,
                        random.generator("calibration", key))
    for line in release_lines(budget, calibrated=platt is not None):
        ledger.append(line)
    credits, bias = dp_credits(trees, params, leaf, features)
    kept = tree_record(trees.model.base_margin, trees.model.trees, dp_values(trees, params),
                       features, names)
    return finish(silos, names, reasons, (margin, history, credits, bias), platt, budget, kept)


def train_staged(job: TreeJob, phases: run_phases.PhaseTimer, ledger: Ledger,
                 random: SecretRandom, reasons: int, params: gbdt_dp.DpTreeParams,
                 init: gbdt_dp_init.InitParams) -> tuple[TrainResult, scoring.Platt, dict]:
    """`train_and_calibrate` with the first additive stage (server/gbdt_dp_init.py): the
    silos start on the stage's scale and answer ONE routing request each for their bit at
    every threshold of every column (everyone's pre-bins), the authority fits the DP
    scorecard on the training people; then the silos start on the trees' scale and the
    random trees route and boost from its margin. Four round trips, one accountant."""
    cfg, key = job.cfg, job.run_key
    budget = plan_budget(cfg, tuple(job.fed.silos), len(job.train), params, init)
    for line in statistics_lines(budget):
        ledger.append(line)
    features = start(job.fed, key, init.card.card.bins, job.train, units=gbdt_dp_init.UNITS)
    silos = ExplainedSilos(job.fed, features,
                           route_positions=np.arange(job.n_positions, dtype=np.int64))
    names = consent_and_names(silos, reasons, job.cfg.explain.reasons > 0)
    t0 = time.perf_counter()
    y = job.y.astype(np.float64)
    stage, pre = gbdt_dp_init.route_and_fit(silos, job.train, y, init, budget.release, random,
                                            purpose=key)
    first = scorecard_dp.margins(stage, pre)
    start(job.fed, key, params.bins, job.train, units=DP_UNITS)
    structure = gbdt_dp.draw_structure(
        silos, params, random.generator(gbdt_dp.PURPOSE, key, "structure"))
    leaf = route_everyone(silos, structure, job.n_positions, params.depth)
    trees = gbdt_dp.boost(leaf[:, job.train], y[job.train], structure, params,
                          budget.release.trees, random, purpose=key, init=first[job.train])
    leaf = trees.leaves(leaf)
    log.info("a DP scorecard stage and %d DP trees in %.1f s, %d round trips", params.trees,
             time.perf_counter() - t0, silos.round_trips + 2)
    phases.start("score")
    margin, history = margins(trees.model, leaf, job.val, y, start=first)
    platt = calibration(margin[job.val], y[job.val], budget, job.n_positions * cfg.split.val,
                        random.generator("calibration", key))
    for line in release_lines(budget, calibrated=platt is not None):
        ledger.append(line)
    credits, bias = dp_credits(trees, params, leaf, features)
    tables, intercept = gbdt_dp_init.stage_credits(stage, pre)
    for name, table in tables.items():
        credits.add_columns(name, table)
    # The kept model holds trees only: scoring after the run cannot replay the stage.
    kept = unsupported_record("gbdt", "its trees start from a first additive stage "
                              "(gbdt.init=additive), which scoring after the run does not replay")
    return finish(silos, names, reasons, (margin, history, credits, bias + intercept),
                  platt, budget, kept, starts=2)


def finish(silos: ExplainedSilos, names: Mapping[str, FeatureNames], reasons: int,
           scored: tuple[np.ndarray, list[dict], Credits, float], platt: scoring.Platt | None,
           budget: Budget[Any], kept: dict,
           starts: int = 1) -> tuple[TrainResult, scoring.Platt, dict]:
    """The run's TrainResult from everyone's margin, the history, the reasons' credits and
    the kept model (`starts`: the query.gbdt_start round trips, besides the silos' counted
    ones)."""
    margin, history, credits, bias = scored
    result = TrainResult(
        bias=bias, logits=margin, history=history,
        round_trips=silos.round_trips + starts, steps=0,
        silo_seconds={s: round(v, 3) for s, v in silos.silo_seconds.items()},
        explained=settle(names, credits, reasons), kept_model=kept)
    return result, platt or scoring.Platt(), summary(budget, platt is not None)


def summary(budget: Budget[Any], calibrated: bool) -> dict:
    """authority.json's privacy figures of the DP trees or scorecard (the keys of
    PrivacyPlan.summary they change): eps_model per population and combined, no label
    budget spent."""
    release = budget.release
    train, val = release.epsilon, budget.calibration_epsilon() if calibrated else 0.0
    return {
        "epsilon": {"model": max(train, val), "model_by_population": {"train": train,
                                                                      "val": val},
                    "model_per_party": None, "label": None, "transcript": None},
        "delta": budget.deltas.combined,
        "delta_accountant": budget.deltas.accountant,
        "delta_thresholds": budget.deltas.reserved,
        "accountant": budget.accountant,
        "noise_multiplier": release.noise_multiplier,
        "joint_noise_multiplier": release.noise_multiplier,
        "blocks": 1,
        "calibration_noise_multiplier": budget.calibration_sigma if calibrated else 0.0,
        "sample_rate": release.sample_rate,
        "steps": release.steps,
        "steps_planned": release.steps,
    }
