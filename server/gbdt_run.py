"""The trees' training and scoring phase of a run (`model.kind=gbdt`, issue 20 item 1): the
authority's driver of server/gbdt.py talking to the silos through Flower messages
(clients/silo/gbdt_handlers.py answers them). The parts: server/gbdt_silos.py (the
messages), server/gbdt_boost.py (g, h, growing the trees), server/gbdt_scores.py (routing,
margins, how many trees to keep).

Protection toward the silos (`gbdt.protection`):
- "rr": g, h are computed from the randomised-response labels the run drew once at
  privacy.label_epsilon (server/label_dp.py), with the forward-corrected gradient and its
  expected (Fisher) hessian, so everything a silo receives is post-processing of the RR
  labels: the ledger's label line is the whole account. At label_epsilon=inf the labels are
  clean and the silos can read them from the sign of g.
- "he": BFV-encrypted g, h (crypto/he.py) is implemented in process only
  (simulations/run/gbdt.py); its ciphertexts do not travel in Flower messages yet, so a run
  refuses it (`refuse_unwired`). For whoever wires it: SEAL objects serialise with their
  save/load (to files); the rotation (Galois) keys are 17 MB at ring 8192, a ciphertext 0.43 MB
  (4,096 rows of g, h), so the keys should go once per run into the silo's run directory, not
  into the node's Flower state, which travels with every message.

The trees themselves are released without differential privacy: this phase runs at
privacy.epsilon=inf and the run reports no eps_model (None: infinite). At a finite epsilon a
tree run trains the DP trees of server/gbdt_dp_run.py instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from clients.protocol.gbdt import STANDARD_UNITS
from server import run_phases, scoring
from server.config import AuthorityConfig, ConfigError
from server.federation import Federation
from server.gbdt_boost import fit, params_of
from server.gbdt_reasons import ExplainedSilos, consent_and_names, settle
from server.gbdt_scores import contribution_summary, keep_best, route, score
from server.gbdt_silos import start
from server.kept_model import tree_record
from server.label_dp import flip_probability
from server.training import TrainResult

log = logging.getLogger(__name__)


def refuse_unwired(cfg: AuthorityConfig) -> None:
    """Refuse what this wiring cannot run, before any message is sent."""
    if cfg.gbdt.protection == "he":
        raise ConfigError(
            "gbdt.protection=he runs in process only in this version "
            "(simulations/run/gbdt.py: BFV ciphertexts are not serialised into Flower messages "
            "yet, and at 100,000 people 50 trees would take about 87 minutes); use "
            "gbdt.protection=rr, whose gradients are label-DP at privacy.label_epsilon")


# authority.json's words on the trees' reason codes and points (server/gbdt_reasons.py).
REASONS_NOTE = (
    "per person, the features whose splits cost the most points: along the person's path in "
    "every tree, each split's change of node value is credited to the split's (silo, column), "
    "a silo's points (points_<silo>, and `contributions` for the SecureBoost trees) are its "
    "columns' credits; each silo consented to them within its policy `explain` "
    "(query.gbdt_explain) and named its features")
REASONS_SEEN = ("each silo's feature names and which column is which feature (its consent to "
                "reason codes); the reasons and points themselves are the authority's own "
                "arithmetic on the splits and paths above")


@dataclass(frozen=True)
class TreeJob:
    fed: Federation
    cfg: AuthorityConfig
    run_key: str
    train: np.ndarray
    val: np.ndarray
    n_positions: int
    y: np.ndarray  # clean labels of every aligned position (calibration, history)
    y_view: np.ndarray  # the labels gradients may see (RR on training positions)


def train_and_calibrate(job: TreeJob, phases: run_phases.PhaseTimer, reasons: int = 0
                        ) -> tuple[TrainResult, scoring.Platt]:
    """Grow the trees over Flower, then (timed as `score`) route everyone and calibrate on
    validation people's clean labels, as the MLP run without DP-SGD does. With `reasons` > 0
    the silos consent first (server/gbdt_reasons.py) and everyone gets reason codes."""
    refuse_unwired(job.cfg)
    params = params_of(job.cfg)
    rho = flip_probability(job.cfg.privacy.label_epsilon)
    everyone = np.arange(job.n_positions, dtype=np.int64)
    features = start(job.fed, job.run_key, params.bins, job.train, binning=params.binning,
                     trees=params.trees, depth=params.depth)
    silos = ExplainedSilos(job.fed, features, route_positions=everyone)
    names = consent_and_names(silos, reasons, job.cfg.explain.reasons > 0)
    t0 = time.perf_counter()
    fitted = fit(silos, job.y_view[job.train], rho, params)
    log.info("%d trees in %.1f s, %d round trips", params.trees, time.perf_counter() - t0,
             silos.round_trips + 1)
    phases.start("score")
    bits = route(fitted.model, silos)
    y = job.y.astype(np.float64)
    kept, curve = keep_best(fitted, bits, job.val, y)
    log.info("kept %d of %d trees (best validation log loss)", len(kept.model.trees),
             params.trees)
    scored = score(kept, bits, job.n_positions, job.train, job.val, y, features)
    calibrate = scoring.Platt.fit(scored.margins[job.val], job.y[job.val])
    result = TrainResult(
        bias=scored.bias, logits=scored.margins, history=curve,
        round_trips=silos.round_trips + 1, steps=0,
        silo_seconds={s: round(v, 3) for s, v in silos.silo_seconds.items()},
        contributions={s: contribution_summary(v) for s, v in scored.contributions.items()},
        explained=settle(names, scored.credits, reasons),
        kept_model=tree_record(kept.model.base_margin, kept.model.trees, scored.values,
                               features, names))
    return result, calibrate


def annotate(out: dict, cfg: AuthorityConfig) -> None:
    """authority.json for a tree run (nothing for an MLP run): what the model is, that its
    epsilon is infinite, and what the authority saw of the silos."""
    if cfg.model.kind != "gbdt":
        return
    out["model"] = {**out["model"], "kind": "gbdt"}
    out["model_kind"] = "gbdt"
    kept = [row["trees"] for row in out.get("history", []) if row.get("kept")]
    out["gbdt"] = {
        **{k: getattr(cfg.gbdt, k) for k in ("trees", "depth", "bins", "binning", "lr",
                                              "reg_lambda", "min_child_weight", "protection")},
        # The model keeps this many of the trees grown: the best validation log loss.
        "trees_kept": kept[0] if kept else cfg.gbdt.trees,
        # The silos bin their prepared matrix divided by this (clients/protocol/gbdt.py).
        "input_scale": STANDARD_UNITS,
        "model_epsilon": "inf",
        "model_note": ("the trees (splits, leaf values) and the scores are released without "
                       "differential privacy: eps_model is infinite (privacy.epsilon=inf)"),
        "label_protection": (f"randomised response at privacy.label_epsilon="
                             f"{cfg.privacy.label_epsilon:g}: the silos' g, h are "
                             "post-processing of the RR labels"
                             if cfg.privacy.label_dp else
                             "none: privacy.label_epsilon=inf, the silos can read every "
                             "training label from the sign of g"),
        "reasons": REASONS_NOTE,
    }
    out["authority_sees"] = [
        "per node of every tree, each silo's per-(feature, bin) sums of g and h",
        "each split's (silo, feature index, bin), never the silo's threshold"
        + (" (with gbdt.binning=quantile the bin is a rank: about the share of training people "
           "at or below the threshold in that silo's column)"
           if cfg.gbdt.binning == "quantile" else ""),
        "the left/right partition of the training rows at every split",
        "every person's left/right bit at each silo's splits (scoring)",
        *([REASONS_SEEN] if out["model"].get("reasons") else []),
    ]
