"""The DP scorecard in `fedscore run` (`model.kind=scorecard` at a finite privacy.epsilon; the
maths and the mechanism are server/scorecard_dp.py's; the budget, the ledger lines, the DP
calibration and the privacy summary are the DP trees' (server/gbdt_dp_run.py), reused).

Messages, every silo at once: the trees' `query.gbdt_start` (run key, pre-bins, units, training
positions), ONE `query.gbdt_route` per silo asking its bit at every threshold of every column
for every aligned person (bit-packed; the generated population's 48 columns x 31 thresholds x
100,000 people are 19 MB over all silos), then, once the model is fitted, the scorecard's own
`train.scorecard_woe` (the DP tables) and `query.scorecard_score` with the points per bin (each
silo writes its `scorecard.csv`) and the reason codes. Four round trips; the authority scores
everyone from the pre-bins it holds.

Privacy. The silos receive nothing label-dependent before the DP model (its WoE tables,
coefficients and points), so no randomised response is drawn and privacy.label_epsilon is not
spent (eps_label None), as for the DP trees. eps_model per population: training people through
the silos' preparation statistics, the noisy counts and the noisy Newton steps; validation
people through the statistics and the DP Platt calibration. Nothing is selected on validation
people: the number of steps is fixed. Each silo's contribution summary (exact quantiles over
people) is not sent: `contributions` stays empty, as for the DP trees. The validation AUC in
`history` is the researcher's diagnostic of the final model, computed after everything is
released and used for no decision.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from clients.protocol.scorecard import TABLE_FILE, WoeTables
from crypto.secret_random import SecretRandom
from server import run_phases, scorecard_dp, scorecard_run, scoring
from server.config import AuthorityConfig
from server.gbdt_dp_run import (
    calibration,
    plan_budget,
    release_lines,
    statistics_lines,
    summary,
)
from server.gbdt_run import TreeJob
from server.gbdt_silos import start
from server.kept_model import scorecard_record
from server.ledger import Ledger
from server.scorecard import points
from server.scorecard_run import (
    UNITS,
    ScorecardSilos,
    calibrated,
    card_params,
    scorecard_history,
)
from server.training import TrainResult

log = logging.getLogger(__name__)


def dp_scorecard(cfg: AuthorityConfig) -> bool:
    """Whether the run trains the DP scorecard."""
    return cfg.model.kind == "scorecard" and cfg.privacy.dp_sgd


def dp_params(cfg: AuthorityConfig) -> scorecard_dp.DpScorecardParams:
    """The DP scorecard's settings from the run's `scorecard.*` keys and privacy.accountant."""
    card = cfg.scorecard
    return scorecard_dp.DpScorecardParams(
        card=card_params(cfg), steps=card.steps, count_share=card.count_share,
        hessian_noise=card.hessian_noise, clip=card.clip, accountant=cfg.privacy.accountant)


def train_scorecard(job: TreeJob, phases: run_phases.PhaseTimer, ledger: Ledger,
                    random: SecretRandom, reasons: int
                    ) -> tuple[TrainResult, scoring.Platt, dict]:
    """A scorecard run's training and calibration: the DP scorecard at a finite epsilon, else
    the non-private one (server/scorecard_run.py, whose privacy the idle PrivacyPlan
    reports)."""
    if dp_scorecard(job.cfg):
        return train_and_calibrate(job, phases, ledger, random, reasons)
    return (*scorecard_run.train_and_calibrate(job, phases, reasons), {})


def train_and_calibrate(job: TreeJob, phases: run_phases.PhaseTimer, ledger: Ledger,
                        random: SecretRandom, reasons: int
                        ) -> tuple[TrainResult, scoring.Platt, dict]:
    """Plan, route everyone once, fit on the training people; then (timed as `score`)
    everyone's margins, the DP calibration, the silos' tables, points and reasons; the
    ledger's lines; what the run reports of its privacy."""
    cfg, key = job.cfg, job.run_key
    params = dp_params(cfg)
    bins = params.card.bins
    budget = plan_budget(cfg, tuple(job.fed.silos), len(job.train), params)
    for line in statistics_lines(budget):
        ledger.append(line)
    everyone = np.arange(job.n_positions, dtype=np.int64)
    features = start(job.fed, key, bins, job.train, units=UNITS)
    silos = ScorecardSilos(job.fed, features, route_positions=everyone)
    t0 = time.perf_counter()
    replies = silos.route_all({name: scorecard_dp.thresholds_request(f, bins)
                               for name, f in features.items()})
    pre = {name: scorecard_dp.pre_bins(replies[name], features[name], bins)
           for name in features}
    y = job.y.astype(np.float64)
    fit = scorecard_dp.fit_from_bins({name: b[job.train] for name, b in pre.items()},
                                     y[job.train], params, budget.release, random, purpose=key)
    model = fit.model
    log.info("dp scorecard in %.1f s, %d round trips", time.perf_counter() - t0,
             silos.round_trips + 1)
    phases.start("score")
    margin = scorecard_dp.margins(model, pre)
    platt = calibration(margin[job.val], y[job.val], budget, job.n_positions * cfg.split.val,
                        random.generator("calibration", key))
    for line in release_lines(budget, calibrated=platt is not None):
        ledger.append(line)
    platt = platt or scoring.Platt()
    silos.woe_tables_all({name: WoeTables(features=model.tables[name]) for name in features})
    _, per_silo = points(calibrated(model, platt), cfg.score)
    explained = silos.finish(model, per_silo, everyone, reasons)
    history = scorecard_history(model, margin[job.val], y[job.val], t0) | {"clip": fit.clip}
    result = TrainResult(
        bias=model.intercept, logits=margin, history=[history],
        round_trips=silos.round_trips + 1, steps=model.steps,
        silo_seconds={s: round(v, 3) for s, v in silos.silo_seconds.items()},
        explained=explained,
        kept_model=scorecard_record(model.coef, model.intercept))
    return result, platt, summary(budget, platt is not None)


def annotate(out: dict, cfg: AuthorityConfig) -> None:
    """authority.json for a scorecard run: the DP scorecard's here, the non-private one's by
    server/scorecard_run.py `annotate` (which leaves other runs alone)."""
    if not dp_scorecard(cfg):
        scorecard_run.annotate(out, cfg)
        return
    params = dp_params(cfg)
    card, eps = params.card, (out.get("epsilon") or {}).get("model")
    last = (out.get("history") or [{}])[-1]
    out["model"] = {**out["model"], "kind": "scorecard"}
    out["model_kind"] = "scorecard"
    out["scorecard"] = {
        "mode": "dp (server/scorecard_dp.py): noisy counts, noisy Newton steps",
        "pre_bins": card.bins,
        "min_bin_share": card.min_bin_share,
        "smoothing": card.smoothing,
        "steps": params.steps,
        "max_steps": params.steps,
        "count_share": params.count_share,
        "hessian_noise": params.hessian_noise,
        "clip": params.clip,
        "clip_bound": last.get("clip"),
        **{k: last.get(k) for k in ("bins", "inputs", "inputs_used")},
        "input_scale": UNITS,
        "tables": f"each silo's <silo dir>/scorecards/<run key>/{TABLE_FILE} (bin ranges in its "
                  "own units; the authority holds only pre-bin indices)",
        "model_epsilon": eps,
        "model_note": (f"the scorecard (WoE tables, coefficients, points) and the scores are "
                       f"({eps:.4g}, {out.get('delta', 0):.3g})-DP for the combined model "
                       "(training people: the silos' statistics, the noisy counts and the "
                       "noisy Newton steps; validation people: the statistics and the DP "
                       "calibration)" if eps is not None and math.isfinite(eps)
                       else "no epsilon recorded"),
        "label_protection": ("not needed: before the DP model the silos receive only the "
                             "training positions and a question about every threshold of "
                             "every column; privacy.label_epsilon is not spent (no randomised "
                             "response is drawn)"),
        "reasons": "per person, the bins that cost the most points (each silo ranks its own "
                   "under the DP model)",
    }
    out["authority_sees"] = [
        "every aligned person's pre-bin of every silo column (one routing request per silo: "
        "the bit at every threshold), on the prepared scale; never a raw value or threshold "
        "in a silo's units",
        "each silo's partial logit per person under the final coefficients, and its reason "
        "codes (both computable from the pre-bins it holds)",
    ]
