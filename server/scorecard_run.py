"""The WoE scorecard's training and scoring phase of a run (`model.kind=scorecard`, issue 20
item 2): the authority's driver of server/scorecard.py talking to the silos through Flower
messages (clients/silo/scorecard_handlers.py answers them, beside the trees' handlers).

Round trips, every silo at once: the trees' `query.gbdt_start` (training positions, pre-bins),
one root histogram of (y, 1) for the counts (`train.gbdt_level`), the WoE tables
(`train.scorecard_woe`), then per regression step one root histogram of (g, h) and one or more
rounds of partial logits (`train.scorecard_logits`: the first trial, and a halved one per
backtrack); scoring is two `query.scorecard_score` rounds: everyone's partial logits (for the
margins and the calibration), then the points per bin, after which each silo writes its own
`scorecard.csv` and returns its reason codes.

Labels toward the silos: the trees' `rr` protection (server/gbdt_run.py), reused as is. The
silos' sums are of the randomised-response labels the run drew once at
privacy.label_epsilon; the counts are forward-corrected ((bad - rho n) / (1 - 2 rho)), and the
regression's g, h and loss are `rr_gradients`'s forward-corrected ones, so all the silos
receive (RR labels' sums as g, WoE tables, coefficients, points) is post-processing of the RR
labels: the ledger's label line is the whole account. At label_epsilon=inf the first histogram
gives every silo the labels. The scorecard itself is released without differential privacy:
a run needs privacy.epsilon=inf (server/config.py refuses a finite one).

Calibration as the trees': Platt on validation people's clean labels; the points sent to the
silos are the calibrated model's (coefficients times the slope a, intercept a c + b), so a
person's published score is the base points plus the points of their bins in the silos' tables
(before rounding and the 300..850 limits).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import cast

import numpy as np
from flwr.app import Message

from clients.protocol import messages as m
from clients.protocol.gbdt import STANDARD_UNITS
from clients.protocol.scorecard import (
    LOGITS,
    SCORE,
    TABLE_FILE,
    WOE,
    PartialLogits,
    PartialLogitsRequest,
    WoeTables,
    pack_tables,
)
from server import run_phases, scoring
from server.config import AuthorityConfig
from server.explanations import Explained, parse
from server.federation import FederationError
from server.gbdt_run import TreeJob
from server.gbdt_scores import contribution_summary, history_row
from server.gbdt_silos import FlowerSilos, start
from server.kept_model import scorecard_record
from server.label_dp import flip_probability
from server.scorecard import ScorecardParams, Silos, VerticalScorecard, fit_scorecard, points
from server.training import TrainResult

log = logging.getLogger(__name__)

# What the silos bin: the trees' scale (equal-width pre-bins over +-4 standard units of the
# prepared matrix). Measured in process on the runs' own people (bench/RESULTS.md "The WoE
# scorecard in fedscore run"): the prepared matrix as is (+-1) gave 0.004 less AUC on the
# generated population (its end bins swallow the tails), neutral on UCI.
UNITS = STANDARD_UNITS


class ScorecardSilos(FlowerSilos):
    """The silos as server/scorecard.py addresses them: the trees' root histograms
    (`gbdt.LevelSilos`) and the scorecard's own messages (`scorecard.AllSilos`), one message
    per silo, every silo at once."""

    def woe_tables_all(self, asked: Mapping[str, WoeTables]) -> None:
        self._exchange(WOE, {name: m.make_content(None, **pack_tables(t.features))
                             for name, t in asked.items()})

    def partial_logits_all(self, asked: Mapping[str, PartialLogitsRequest]
                           ) -> dict[str, PartialLogits]:
        replies = self._exchange(LOGITS, {
            name: m.make_content({"round": r.round},
                                 weights=np.asarray(r.weights, dtype=np.float64))
            for name, r in asked.items()})
        return {name: PartialLogits(silo=name, round=asked[name].round,
                                    logits=m.get_array(reply, "logits", np.float64, 1))
                for name, reply in replies.items()}

    def partial_logits_at(self, coef: Mapping[str, np.ndarray], positions: np.ndarray
                          ) -> dict[str, np.ndarray]:
        """Each silo's partial logits over aligned `positions` (scoring)."""
        replies = self._exchange(SCORE, {
            name: m.make_content(weights=np.asarray(coef[name], dtype=np.float64),
                                 positions=positions) for name in self.features})
        return {name: _logits(name, reply, len(positions)) for name, reply in replies.items()}

    def finish(self, model: VerticalScorecard, table_points: Mapping[str, tuple[np.ndarray, ...]],
               positions: np.ndarray, reasons: int) -> dict[str, Explained]:
        """Every silo gets its points per bin (and writes its table); with `reasons` > 0,
        each silo's reason codes over `positions` under the model's coefficients."""
        replies = self._exchange(SCORE, {
            name: m.make_content({"reasons": reasons},
                                 weights=np.asarray(model.coef[name], dtype=np.float64),
                                 positions=positions,
                                 points=np.concatenate(table_points[name]))
            for name in self.features})
        if not reasons:
            return {}
        return {name: parse(reply, name, len(positions), reasons)
                for name, reply in replies.items()}


def _logits(name: str, reply: Message, rows: int) -> np.ndarray:
    logits = m.get_array(reply, "logits", np.float64, 1)
    if logits.shape != (rows,):
        raise FederationError(f"silo {name!r} returned partial logits of the wrong shape")
    return logits


def card_params(cfg: AuthorityConfig) -> ScorecardParams:
    """The scorecard's settings from the run's `scorecard.*` keys (server/config_scorecard.py)."""
    card = cfg.scorecard
    return ScorecardParams(bins=card.bins, min_bin_share=card.min_bin_share,
                           smoothing=card.smoothing, iterations=card.iterations)


def calibrated(model: VerticalScorecard, platt: scoring.Platt) -> VerticalScorecard:
    """The same scorecard with the calibration folded in: logit a z + b."""
    return replace(model, coef={s: platt.a * c for s, c in model.coef.items()},
                   intercept=platt.a * model.intercept + platt.b)


def train_and_calibrate(job: TreeJob, phases: run_phases.PhaseTimer, reasons: int
                        ) -> tuple[TrainResult, scoring.Platt]:
    """Fit the scorecard over Flower on the training people's RR labels, then (timed as
    `score`) everyone's margins, the calibration on validation people's clean labels, the
    silos' points tables and, for `reasons` > 0, their reason codes."""
    params = card_params(job.cfg)
    rho = flip_probability(job.cfg.privacy.label_epsilon)
    everyone = np.arange(job.n_positions, dtype=np.int64)
    features = start(job.fed, job.run_key, params.bins, job.train, units=UNITS)
    silos = ScorecardSilos(job.fed, features)
    t0 = time.perf_counter()
    # server/scorecard.py asks these silos only through histograms_all, woe_tables_all,
    # partial_logits_all and each endpoint's `features`.
    model = fit_scorecard(cast(Silos, silos), job.y_view[job.train], params, rho)
    log.info("scorecard: %d steps in %.1f s, %d round trips", model.steps,
             time.perf_counter() - t0, silos.round_trips + 1)
    phases.start("score")
    partial = silos.partial_logits_at(model.coef, everyone)
    margin = model.intercept + sum(partial.values(), np.zeros(job.n_positions))
    y = job.y.astype(np.float64)
    platt = scoring.Platt.fit(margin[job.val], y[job.val])
    _, per_silo = points(calibrated(model, platt), job.cfg.score)
    explained = silos.finish(model, per_silo, everyone, reasons)
    result = TrainResult(
        bias=model.intercept, logits=margin,
        history=[scorecard_history(model, margin[job.val], y[job.val], t0)],
        round_trips=silos.round_trips + 1, steps=model.steps,
        silo_seconds={s: round(v, 3) for s, v in silos.silo_seconds.items()},
        contributions={s: contribution_summary(v) for s, v in partial.items()},
        explained=explained,
        kept_model=scorecard_record(model.coef, model.intercept))
    return result, platt


def scorecard_history(model: VerticalScorecard, margin_val: np.ndarray, y_val: np.ndarray,
                      t0: float) -> dict:
    """The scorecard's one history row: validation figures after the fit (its epoch is the
    whole regression), the steps taken, the merged bins and the inputs the fit kept."""
    history = history_row(margin_val, y_val, model.steps, t0)
    del history["trees"]
    return history | {
        "steps": model.steps,
        "bins": sum(len(t.woe) for ts in model.tables.values() for t in ts),
        "inputs": sum(len(c) for c in model.coef.values()),
        "inputs_used": sum(int(np.count_nonzero(c)) for c in model.coef.values())}


def annotate(out: dict, cfg: AuthorityConfig) -> None:
    """authority.json for a scorecard run (nothing for another): what the model is, that its
    epsilon is infinite, where the points tables are, and what the authority saw."""
    if cfg.model.kind != "scorecard":
        return
    params = card_params(cfg)
    last = (out.get("history") or [{}])[-1]
    out["model"] = {**out["model"], "kind": "scorecard"}
    out["model_kind"] = "scorecard"
    out["scorecard"] = {
        "pre_bins": params.bins,
        "min_bin_share": params.min_bin_share,
        "smoothing": params.smoothing,
        "max_steps": params.iterations,
        "steps": out.get("training_steps"),
        **{k: last.get(k) for k in ("bins", "inputs", "inputs_used")},
        "input_scale": UNITS,
        "tables": f"each silo's <silo dir>/scorecards/<run key>/{TABLE_FILE} (bin ranges in its "
                  "own units; the authority holds only pre-bin indices)",
        "model_epsilon": "inf",
        "model_note": ("the scorecard (bins, WoE, coefficients, points) and the scores are "
                       "released without differential privacy: eps_model is infinite "
                       "(privacy.epsilon=inf)"),
        "label_protection": (f"randomised response at privacy.label_epsilon="
                             f"{cfg.privacy.label_epsilon:g}: the silos' sums of labels and "
                             "gradients, the WoE tables and the coefficients are "
                             "post-processing of the RR labels"
                             if cfg.privacy.label_dp else
                             "none: privacy.label_epsilon=inf, the first histogram gives every "
                             "silo the training labels"),
        "reasons": "per person, the bins that cost the most points (each silo ranks its own)",
    }
    out["authority_sees"] = [
        "each silo's per-(feature, pre-bin) sums of the labels it was sent and of ones",
        "at each regression step, each silo's per-(feature, pre-bin) sums of g and h",
        "each silo's partial logit per person at every trial coefficient vector (enough "
        "trials reveal each person's merged bin of each feature, never a threshold)",
        "each silo's reason codes per person (its features whose bins cost the most points)",
    ]
