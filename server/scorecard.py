"""The authority's side of the vertical WoE scorecard (issue 20 item 2).

`fit_scorecard` and `predict_margins` drive the protocol of clients/protocol/scorecard.py
through `ScorecardEndpoint`s called in process (the silos' side is clients/silo/scorecard.py),
as server/gbdt.py does for the trees; `fedscore run --set model.kind=scorecard` drives the same
code over Flower messages (server/scorecard_run.py's silos are `gbdt.LevelSilos` and
`AllSilos`: one message per silo per round, every silo at once). With randomised-response
labels (rho > 0), the counts are forward-corrected and the regression uses the trees'
corrected gradient and loss (`rr_gradients`), so the silos see post-processing of the RR labels.

1. Counts: g = y, h = 1 on the trees' histogram path (server/gbdt.py's `send_gradients` and
   `node_sums`), root node only: per (silo, feature, pre-bin) the defaulters and the people,
   decrypted at the authority under `protection="he"`, so no silo sees a label.
2. Bins and WoE: per feature, the non-empty pre-bins merged by server/woe.py (the central
   reference's maths: small bins into a neighbour, then the monotone default-rate trend) and
   their smoothed WoE; each silo is told its tables as cut points on its own pre-bin indices.
3. Coefficients: logit = intercept + sum_(k,f) beta_(k,f) * WoE_(k,f)(bin), every beta <= 0
   (the convention of simulations/analysis/references.py's `fit_sign_constrained_logistic`:
   a bin with more non-defaulters than average can only lower the risk), by a projected
   quasi-Newton method. The authority never holds the WoE columns: the gradient of the mean
   log loss in beta_(k,f) is sum_b WoE_(k,f,b) * sum_(i in b) (p_i - y_i) / n and the diagonal
   of its Hessian sum_b WoE_(k,f,b)^2 * sum_(i in b) p_i (1 - p_i) / n, both from one root
   histogram of (p - y, p (1 - p)) per step on the same protected path; the margins come from
   the silos' partial logits. The cross-feature Hessian is unknown to the authority: L-BFGS
   pairs supply it from the gradients' changes, starting from the diagonal, and a step is
   halved until the loss falls. It reaches the central projected Newton's bounded maximum
   likelihood (48 inputs of the generated population: 17 steps, coefficients within 2e-6);
   the diagonal step alone had not converged after 200.
4. Points: on the project's 300..850 scale (server/scoring.py's PDO mapping): base points
   offset - factor * intercept, and -factor * beta * WoE per bin; the unrounded score is the
   base plus the points of the person's bins.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from clients.protocol.gbdt import HistogramRequest, NodeRows
from clients.protocol.scorecard import (
    FeatureWoe,
    PartialLogits,
    PartialLogitsRequest,
    PointsTables,
    ScorecardEndpoint,
    WoeTables,
)
from crypto import he
from server.config import ScoreConfig
from server.gbdt import LevelSilos, node_sums, send_gradients, sigmoid
from server.gbdt_boost import base_margin, rr_gradients
from server.scoring import scale
from server.woe import monotone_woe, projected_step

log = logging.getLogger(__name__)

Silos = Mapping[str, ScorecardEndpoint]


@runtime_checkable
class AllSilos(Protocol):
    """Silos addressed all at once, one message each (the Flower wiring,
    server/scorecard_run.py); a plain mapping of `ScorecardEndpoint`s is asked one call at a
    time instead (in process). Histograms go the trees' way (`gbdt.LevelSilos`)."""

    def woe_tables_all(self, asked: Mapping[str, WoeTables]) -> None: ...

    def partial_logits_all(self, asked: Mapping[str, PartialLogitsRequest]
                           ) -> dict[str, PartialLogits]: ...


@dataclass(frozen=True, kw_only=True)
class ScorecardParams:
    bins: int = 32  # equal-width pre-bins per feature over [-1, 1] (clients/silo/gbdt.py)
    min_bin_share: float = 0.05  # of the training people, per final bin (as the reference)
    smoothing: float = 0.5  # pseudo-count per bin and class (as the reference)
    iterations: int = 50  # at most, each one root histogram and a few partial-logit rounds
    # "he": the silos see y and p - y only under BFV (bins a power of two); "plain" reveals
    # labels to the silos: simulation only.
    protection: Literal["plain", "he"] = "plain"

    def __post_init__(self) -> None:
        if not 2 <= self.bins <= 256 or self.iterations < 0:
            raise ValueError("bins must lie in [2, 256] and iterations be >= 0")
        if not 0 <= self.min_bin_share < 1 or self.smoothing <= 0:
            raise ValueError("min_bin_share must lie in [0, 1) and smoothing be > 0")


@dataclass(frozen=True, kw_only=True)
class VerticalScorecard:
    """What the authority holds: per silo its WoE tables (on pre-bin indices) and one
    coefficient per feature, and the intercept; no threshold in any silo's units."""

    params: ScorecardParams
    tables: dict[str, tuple[FeatureWoe, ...]]
    coef: dict[str, np.ndarray]
    intercept: float
    steps: int = 0  # of the regression (each one root histogram round trip)


def root_sums(silos: Silos, g: np.ndarray, h: np.ndarray, round_id: int, bins: int,
              keys: he.SecretHe | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per silo the root node's (G, H), each (features, bins), on the trees' protected path."""
    send_gradients(silos, g, h, round_id, keys)
    request = HistogramRequest(
        tree=round_id, nodes=(NodeRows(node=0, rows=np.arange(len(g), dtype=np.int64)),))
    raw = (silos.histograms_all(request) if isinstance(silos, LevelSilos)
           else {name: silo.histograms(request) for name, silo in silos.items()})
    out = {}
    for name, silo in silos.items():
        sums = node_sums(raw[name], silo.features, bins, keys)
        if set(sums) != {0}:
            raise ValueError(f"silo {name} answered for other nodes than the root")
        out[name] = sums[0]
    return out


def feature_woe(n: np.ndarray, bad: np.ndarray, params: ScorecardParams) -> FeatureWoe:
    """One feature's merged bins from its pre-bins' people `n` and defaulters `bad`.

    Empty pre-bins are dropped first (a value there at scoring time joins the next non-empty
    bin above, the last one's below), so the merging sees exactly what the central reference
    sees for the same bins: its candidate cuts are the values present."""
    present = np.flatnonzero(n > 0)
    if not len(present):
        raise ValueError("a feature without people")
    cuts, woe = monotone_woe(list(present[:-1].astype(np.float64)), list(n[present]),
                             list(bad[present]), min_count=params.min_bin_share * n.sum(),
                             smoothing=params.smoothing)
    return FeatureWoe(cuts=cuts.astype(np.int64), woe=woe)


def pre_bin_woe(tables: tuple[FeatureWoe, ...], bins: int) -> np.ndarray:
    """(features, bins) WoE of each pre-bin under the merged tables."""
    pre = np.arange(bins)
    return np.array([t.woe[np.searchsorted(t.cuts, pre, side="left")] for t in tables])


def margins(silos: Silos, coef: Mapping[str, np.ndarray], intercept: float, rows: int,
            round_id: int) -> np.ndarray:
    """The intercept plus every silo's partial logits."""
    z = np.full(rows, intercept)
    asked = {name: PartialLogitsRequest(round=round_id, weights=coef[name]) for name in silos}
    replies = (silos.partial_logits_all(asked) if isinstance(silos, AllSilos)
               else {name: silo.partial_logits(asked[name]) for name, silo in silos.items()})
    for name, reply in replies.items():
        if reply.logits.shape != (rows,):
            raise ValueError(f"silo {name} returned partial logits of the wrong shape")
        z += reply.logits
    return z


def send_tables(silos: Silos, tables: Mapping[str, tuple[FeatureWoe, ...]]) -> None:
    """Tell every silo its merged bins and their WoE."""
    asked = {name: WoeTables(features=tables[name]) for name in silos}
    if isinstance(silos, AllSilos):
        silos.woe_tables_all(asked)
        return
    for name, silo in silos.items():
        silo.woe_tables(asked[name])


def _mean_loss(z: np.ndarray, y: np.ndarray, rho: float = 0.0) -> float:
    """Mean log loss; with randomised-response labels (flip probability rho > 0), the
    forward-corrected one (server/label_dp.py), whose gradient is `rr_gradients`'s g."""
    if rho == 0.0:
        return float(np.mean(np.logaddexp(0.0, z) - y * z))
    q = np.clip(rho + (1 - 2 * rho) * sigmoid(z), 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def clean_counts(bad: np.ndarray, n: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """Per bin (defaulters, people) from the sums of the labels the silos saw and of ones:
    whole numbers, in the clear or after decryption; with randomised-response labels, the
    unbiased estimate of the clean defaulters (bad - rho n) / (1 - 2 rho), held to [0, n]."""
    bad, n = np.rint(bad), np.rint(n)
    if rho == 0.0:
        return bad, n
    return np.clip((bad - rho * n) / (1 - 2 * rho), 0.0, n), n


def _split(w: np.ndarray, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    bounds = np.cumsum([0, *sizes.values()])
    return {name: w[bounds[i]:bounds[i + 1]] for i, name in enumerate(sizes)}


def _derivatives(silos: Silos, y: np.ndarray, z: np.ndarray, woe: Mapping[str, np.ndarray],
                 round_id: int, params: ScorecardParams, keys: he.SecretHe | None,
                 rho: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian diagonal of the mean loss in (every beta, intercept), from one
    root histogram of (p - y, p (1 - p)) per silo; with RR labels (rho > 0) the trees'
    forward-corrected gradient and expected hessian (server/gbdt_boost.py `rr_gradients`), a
    function of the margins and the RR labels only."""
    g, h = rr_gradients(z, y, rho)
    sums = root_sums(silos, g, h, round_id, params.bins, keys)
    grad = [np.sum(woe[name] * sums[name][0], axis=1) for name in silos]
    hess = [np.sum(woe[name] ** 2 * sums[name][1], axis=1) for name in silos]
    return (np.concatenate([*grad, [g.sum()]]) / len(y),
            np.concatenate([*hess, [h.sum()]]) / len(y))


MEMORY = 10  # curvature pairs kept by the quasi-Newton direction


def _direction(g: np.ndarray, hdiag: np.ndarray, free: np.ndarray,
               pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """L-BFGS's two-loop recursion on the free coordinates, started from the diagonal
    Hessian (the only curvature the histograms give): the pairs (s, change of gradient) of
    earlier steps supply the cross-feature curvature the authority cannot sum directly."""
    q = np.where(free, g, 0.0)
    alphas = []
    for s, d in reversed(pairs):
        s, d = s * free, d * free
        rho = 1.0 / max(float(s @ d), 1e-300)
        alpha = rho * float(s @ q)
        q -= alpha * d
        alphas.append((rho, alpha, s, d))
    r = q / (hdiag + 1e-10)
    for rho, alpha, s, d in reversed(alphas):
        r += s * (alpha - rho * float(d @ r))
    r = np.where(free, r, 0.0)
    if float(r @ g) <= 0:  # not a descent direction: the diagonal step is
        return np.where(free, g / (hdiag + 1e-10), 0.0)
    return r


def fit_coefficients(silos: Silos, y: np.ndarray, woe: Mapping[str, np.ndarray],
                     params: ScorecardParams, keys: he.SecretHe | None, rho: float = 0.0
                     ) -> tuple[dict[str, np.ndarray], float, int]:
    """Projected quasi-Newton with backtracking (each trial one partial-logit round):
    (coef per silo, intercept, steps taken). Every decision (steps, their acceptance) depends
    on the labels only through `y` (the RR labels when rho > 0) and the silos' answers."""
    sizes = {name: woe[name].shape[0] for name in silos}
    d, n = sum(sizes.values()), len(y)
    w = np.concatenate([np.zeros(d), [base_margin(y, rho)]])
    asked = 0

    def trial(cand: np.ndarray) -> tuple[float, np.ndarray]:
        """The loss at `cand`, from one round of the silos' partial logits."""
        nonlocal asked
        asked += 1
        new_z = margins(silos, _split(cand, sizes), float(cand[d]), n, asked)
        return _mean_loss(new_z, y, rho), new_z

    z = margins(silos, _split(w, sizes), float(w[d]), n, asked)
    loss, steps = _mean_loss(z, y, rho), 0
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    last: tuple[np.ndarray, np.ndarray] | None = None  # (step taken, gradient before it)
    for steps in range(1, params.iterations + 1):
        g, hdiag = _derivatives(silos, y, z, woe, steps, params, keys, rho)
        if last is not None and float(last[0] @ (g - last[1])) > 1e-12:
            pairs = [*pairs[-(MEMORY - 1):], (last[0], g - last[1])]
        free = np.append((w[:d] < 0) | (g[:d] > 0), True)
        if np.abs(g[free]).max() < 1e-9:
            break
        step = _direction(g, hdiag, free, pairs)
        taken = projected_step(w, step, d, loss, trial)
        if taken is None:
            break  # no step lowers the loss: converged to the precision of the sums
        cand, new_loss, new_z = taken
        converged = loss - new_loss < 1e-12
        last = (cand - w, g)
        w, z, loss = cand, new_z, new_loss
        if converged:
            break
    log.debug("scorecard: %d steps, %d partial-logit rounds, loss %.8f", steps, asked, loss)
    return _split(w, sizes), float(w[d]), steps


def fit_scorecard(silos: Silos, y: np.ndarray, params: ScorecardParams, rho: float = 0.0
                  ) -> VerticalScorecard:
    """Bins and WoE from protected counts, then the sign-constrained regression. y is the
    0/1 labels of the silos' aligned rows that the silos may see: the clean ones (rho = 0),
    or randomised response with flip probability rho, whose counts and gradients are
    forward-corrected so that all the silos receive (g, the WoE tables, the coefficients) is
    post-processing of the RR labels."""
    if not silos:
        raise ValueError("at least one silo is needed")
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y must be a 1-d array of 0/1 labels")
    keys = he.keygen(params=he.HeParams(bins=params.bins)) if params.protection == "he" else None
    counts = root_sums(silos, y, np.ones_like(y), 0, params.bins, keys)
    tables = {}
    for name, (bad, n) in counts.items():
        bad, n = clean_counts(bad, n, rho)
        tables[name] = tuple(feature_woe(n[f], bad[f], params) for f in range(n.shape[0]))
    send_tables(silos, tables)
    woe = {name: pre_bin_woe(tables[name], params.bins) for name in silos}
    coef, intercept, steps = fit_coefficients(silos, y, woe, params, keys, rho)
    log.info("vertical scorecard: %d bins over %d features, %d steps",
             sum(len(t.woe) for ts in tables.values() for t in ts),
             sum(len(ts) for ts in tables.values()), steps)
    return VerticalScorecard(params=params, tables=tables, coef=coef, intercept=intercept,
                             steps=steps)


def predict_margins(model: VerticalScorecard, silos: Silos, rows: int) -> np.ndarray:
    """Logits of `rows` people held by `silos` (fresh silos on the rows to score): each is
    told its tables, then asked for its partial logits under the fitted coefficients."""
    missing = set(model.tables) - set(silos)
    if missing:
        raise ValueError(f"the scorecard needs silos {sorted(missing)}, which are not here")
    used = {name: silos[name] for name in model.tables}
    send_tables(used, model.tables)
    return margins(used, model.coef, model.intercept, rows, 0)


def points(model: VerticalScorecard, cfg: ScoreConfig
           ) -> tuple[float, dict[str, tuple[np.ndarray, ...]]]:
    """(base points, per silo the points of each merged bin of each feature): the unrounded
    score offset - factor * logit is the base plus the points of a person's bins."""
    offset, factor = scale(cfg)
    per_silo = {name: tuple(-factor * float(model.coef[name][f]) * t.woe
                            for f, t in enumerate(tables))
                for name, tables in model.tables.items()}
    return offset - factor * model.intercept, per_silo


def send_points(model: VerticalScorecard, silos: Silos, cfg: ScoreConfig) -> float:
    """Tell every silo its points per bin; returns the base points (the authority's)."""
    base, per_silo = points(model, cfg)
    for name, table in per_silo.items():
        silos[name].points_tables(PointsTables(points=table))
    return base
