"""Scoring after the run: the authority re-scores people through the federation.

The silos keep their models of the final round under the run key (clients/silo/state.py), so a
later federation session restores them (`query.resume`) and answers `query.score` for any
positions: the people's current records (with the corrections a dispute made), or a later
cohort's. The authority adds the silos' contributions (a secure sum when the run used one),
applies its bias and calibration, and turns the result into scores, tiers and reason codes
exactly as at the end of the run.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol import messages as m
from server import explanations, rescore_kept, scoring
from server.config import AuthorityConfig
from server.config_keys import parse_flat
from server.federation import Federation, FederationError
from server.kept_model import KINDS, KeptModelError, read_kept

log = logging.getLogger(__name__)


class RescoreError(ValueError):
    """A run that cannot be re-scored, or a request that does not fit it."""


@dataclass(frozen=True)
class Scorer:
    """What the authority kept of a finished run to score again."""

    cfg: AuthorityConfig
    bias: float
    calibrate: scoring.Platt
    run_key: str
    final_round: int
    reasons: int
    positions: int
    kept: dict | None = None  # a tree or scorecard run's model (server/kept_model.py)

    @classmethod
    def from_run(cls, run_dir: Path, ignore: tuple[str, ...] = (),
                 keystore: Path | None = None) -> Scorer:
        """`keystore`: the one the run wrote its files with (a tree or scorecard run's kept
        model is encrypted with it)."""
        path = run_dir / "authority.json"
        if not path.exists():
            raise RescoreError(f"{run_dir} has no authority.json: the run did not finish; "
                               "resume it (fedscore run --resume) before scoring with it")
        info = json.loads(path.read_text())
        if "model" not in info:
            raise RescoreError(f"{run_dir} was made by an older fedscore that did not keep what "
                               "re-scoring needs; run it again")
        cfg = parse_flat(AuthorityConfig, info["config"], ignore=ignore)
        model = info["model"]
        if cfg.model.kind in KINDS:  # trees, scorecard: the authority's kept model
            if cfg.topology != "vertical":
                raise RescoreError(f"re-scoring a horizontal model.kind={cfg.model.kind} run is "
                                   "not built")
            try:
                kept = read_kept(run_dir, keystore, cfg.model.kind)
            except KeptModelError as exc:
                raise RescoreError(str(exc)) from None
            # The silos keep no rounds of a tree or scorecard run: round 0 (the alignment,
            # the pinned mode) and the run's kept start and tables (clients/silo/kept_state.py).
            return cls(cfg, float(model["bias"]), scoring.Platt.from_json(info["calibration"]),
                       str(model["run_key"]), 0, int(model["reasons"]),
                       int(info["people"]["aligned"]), kept)
        if cfg.aggregation.mode != "sum":
            raise RescoreError("re-scoring needs a run in aggregation.mode=sum; this run used "
                               f"{cfg.aggregation.mode!r}")
        if cfg.privacy.transcript_dp:
            raise RescoreError("this run noised every released contribution (transcript DP); "
                               "scoring again would release more, which its accountant does not "
                               "cover. Score with a run without privacy.transcript_sigma")
        return cls(cfg, float(model["bias"]), scoring.Platt.from_json(info["calibration"]),
                   str(model["run_key"]), int(model["final_round"]), int(model["reasons"]),
                   int(info["people"]["aligned"]))


@dataclass
class Scored:
    """Scores for the positions asked, in their order."""

    positions: np.ndarray
    frame: pd.DataFrame  # probability, score, tier [+ points and reasons]
    seconds: float  # the federation round trip
    drift: dict[str, float] = field(default_factory=dict)  # per silo: PSI of its points


def restore(fed: Federation, scorer: Scorer) -> None:
    """Every silo reloads its final-round model and the run's alignment."""
    fed.broadcast(m.RESUME, m.make_content({"run": scorer.run_key,
                                            "round": scorer.final_round}))


def correct(fed: Federation, scorer: Scorer, position: int, silo: str, field_: str,
            value: float, category: str) -> None:
    """The silo records the corrected value of one field of the person at `position`."""
    if silo not in fed.silos:
        raise RescoreError(f"no silo {silo!r} in this federation; silos: {', '.join(fed.silos)}")
    _check_positions(scorer, np.array([position]))
    fed.exchange(m.CORRECT, {silo: m.make_content(
        {"field": field_, "value": float(value), "category": category},
        position=np.array([position], dtype=np.int64))})


def score(fed: Federation, scorer: Scorer, positions: np.ndarray, cohort: str = "",
          drift: bool = False, explain: int | None = None) -> Scored:
    """Scores (and reason codes, unless explain=0) for `positions` through the federation."""
    positions = np.asarray(positions, dtype=np.int64)
    _check_positions(scorer, positions)
    k = scorer.reasons if explain is None else explain
    if scorer.kept is not None:
        return _score_kept(fed, scorer, positions, k, cohort, drift)
    config = {"request": secrets.token_hex(8), "explain": k, "cohort": cohort, "drift": drift}
    t0 = time.perf_counter()
    replies = fed.broadcast(m.SCORE, m.make_content(config, positions=positions))
    seconds = time.perf_counter() - t0
    secure = scorer.cfg.aggregation.secure_sum
    from server.training import _summed  # the training stack (torch) only when scoring

    try:
        total = _summed(replies, "contributions", len(positions), secure)
    except FederationError as exc:
        raise FederationError(f"re-scoring failed: {exc}") from None
    p = scorer.calibrate(scorer.bias + total)
    points = scoring.to_score(p, scorer.cfg.score)
    frame = pd.DataFrame({
        "probability": p, "score": points,
        "tier": pd.Categorical.from_codes(scoring.to_tier(points), scoring.TIER_KEYS)})
    if k:
        explained = {s: explanations.parse(replies[s], s, len(positions), k) for s in fed.silos}
        frame = pd.concat([frame, explanations.points_frame(
            explained, scorer.bias, scorer.calibrate, scorer.cfg.score, k)], axis=1)
    psi = {s: float(m.get_config(r)["drift.psi"]) for s, r in replies.items()} if drift else {}
    return Scored(positions, frame, seconds, psi)


def _score_kept(fed: Federation, scorer: Scorer, positions: np.ndarray, k: int, cohort: str,
                drift: bool) -> Scored:
    """A tree or scorecard run's scores (server/rescore_kept.py), turned into probabilities,
    scores, tiers, points and reasons as the run did (server/run_results.py)."""
    kind = scorer.cfg.model.kind
    if cohort or drift:
        raise RescoreError(f"scoring a later cohort or its drift is built for MLP runs only, "
                           f"not model.kind={kind}")
    assert scorer.kept is not None
    t0 = time.perf_counter()
    try:
        if kind == "gbdt":
            margin, why = rescore_kept.tree_margins(fed, scorer.kept, positions, k)
        else:
            margin, why = rescore_kept.scorecard_margins(fed, scorer.kept, positions, k)
    except FederationError as exc:
        raise FederationError(f"re-scoring failed: {exc}") from None
    seconds = time.perf_counter() - t0
    p = scorer.calibrate(margin)
    points = scoring.to_score(p, scorer.cfg.score)
    frame = pd.DataFrame({
        "probability": p, "score": points,
        "tier": pd.Categorical.from_codes(scoring.to_tier(points), scoring.TIER_KEYS)})
    if k and why:
        frame = pd.concat([frame, explanations.points_frame(
            why, scorer.bias, scorer.calibrate, scorer.cfg.score, k)], axis=1)
    return Scored(positions, frame, seconds)


def _check_positions(scorer: Scorer, positions: np.ndarray) -> None:
    if len(positions) == 0:
        raise RescoreError("no people to score")
    if positions.min() < 0 or positions.max() >= scorer.positions:
        raise RescoreError(f"positions must lie in 0..{scorer.positions - 1}")
