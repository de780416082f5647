"""A credit analyst's central references, beside the central MLP (issue 20, item 8).

Simulation-only, like every baseline of this package (issue 10): they need every party's table
joined in one place, which exists only because the simulation holds all of them. They answer
"how far is the federated model from what an analyst with all the data would fit", never
"what a party could compute". Both use the run's own train/val/test split and the prepared
features the MLPs see, are calibrated like the other baselines (Platt on validation logits)
and scored with the same metric functions.

`central_gbdt`: LightGBM with the parameters an analyst would start from, early stopping on
validation; one thread and deterministic, seeded from the run seed.

`central_scorecard`: the classic scorecard. Per feature, quantile pre-bins merged until every
bin holds enough people and the default rate is monotone (the direction that fits the training
labels best); weight of evidence per bin from the training labels; a logistic regression over
the WoE columns whose coefficients are constrained to the WoE-consistent sign. Written here in
numpy instead of optbinning, the reference library, which pulls ortools, cvxpy and six solver
packages (about 310 MB installed) for what takes about a hundred lines here; the count-based
merging and WoE are server/woe.py's, shared with the vertical scorecard (server/scorecard.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
from threadpoolctl import threadpool_limits

from server.metrics import summary
from server.scoring import Platt
from server.woe import monotone_woe, projected_step
from simulations.analysis.baselines import BaselineResult, JoinedData, val_metrics

log = logging.getLogger(__name__)

GBDT = "central_gbdt"
SCORECARD = "central_scorecard"
REFERENCES = (GBDT, SCORECARD)


@dataclass(frozen=True)
class Split:
    """Positions of the training, validation and test people in the feature matrix."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# ---- gradient boosting -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GbdtParams:
    """A credit analyst's starting point: moderate trees, a slow rate, early stopping."""

    num_leaves: int = 31
    learning_rate: float = 0.05
    max_rounds: int = 500
    min_child_samples: int = 50
    early_stopping: int = 50  # rounds without a better validation log loss


def fit_gbdt(x: np.ndarray, y: np.ndarray, split: Split, seed: int,
             params: GbdtParams | None = None) -> lgb.Booster:
    """Boosted trees on the training rows, stopped early on the validation rows."""
    params = params or GbdtParams()
    config = {
        "objective": "binary", "metric": "binary_logloss",
        "num_leaves": params.num_leaves, "learning_rate": params.learning_rate,
        "min_child_samples": params.min_child_samples,
        # One thread (the machine's other core runs the other baselines or a silo) and the
        # same trees for the same seed on every run.
        "num_threads": 1, "deterministic": True, "force_row_wise": True,
        "seed": seed, "verbosity": -1,
    }
    train = lgb.Dataset(x[split.train], y[split.train], free_raw_data=True)
    val = lgb.Dataset(x[split.val], y[split.val], reference=train)
    return lgb.train(config, train, num_boost_round=params.max_rounds, valid_sets=[val],
                     callbacks=[lgb.early_stopping(params.early_stopping, verbose=False)])


def gbdt_logits(model: lgb.Booster, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, raw_score=True, num_iteration=model.best_iteration,
                                    num_threads=1), dtype=np.float64)


# ---- WoE scorecard ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScorecardParams:
    max_bins: int = 10  # quantile pre-bins per feature
    min_bin_share: float = 0.05  # of the training people, per final bin (a common rule)
    smoothing: float = 0.5  # pseudo-count per bin and class: a bin without defaults stays finite


@dataclass(frozen=True)
class FeatureBins:
    """One feature's bins: bin i holds cuts[i-1] < x <= cuts[i] (open at both ends)."""

    cuts: np.ndarray  # ascending inner cut points
    woe: np.ndarray  # per bin: ln(share of non-defaulters / share of defaulters)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return self.woe[np.searchsorted(self.cuts, x, side="left")]


@dataclass(frozen=True)
class Scorecard:
    """Logit of default = intercept + sum_j coef_j * WoE_j(x_j), every coef_j <= 0: a bin
    with more non-defaulters than average (WoE > 0) can only lower the risk."""

    bins: tuple[FeatureBins, ...]
    coef: np.ndarray
    intercept: float

    def woe(self, x: np.ndarray) -> np.ndarray:
        return np.column_stack([b.transform(x[:, j]) for j, b in enumerate(self.bins)])

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.intercept + self.woe(x) @ self.coef


def _candidate_cuts(v: np.ndarray, max_bins: int) -> np.ndarray:
    """The distinct values when there are few (indicators, codes), else quantiles; never the
    maximum, which would leave its bin empty."""
    values = np.unique(v)
    if len(values) <= max_bins:
        return values[:-1]
    qs = np.quantile(v, np.linspace(0, 1, max_bins + 1)[1:-1])
    return np.unique(qs[qs < values[-1]])


def monotone_bins(v: np.ndarray, y: np.ndarray, params: ScorecardParams) -> FeatureBins:
    """Quantile pre-bins, then server/woe.py's merging (small bins into a neighbour, then the
    monotone default-rate trend that fits the labels better) and smoothed WoE: the same
    count-based maths the vertical scorecard applies to the silos' histograms."""
    cuts = list(_candidate_cuts(v, params.max_bins))
    index = np.searchsorted(np.asarray(cuts), v, side="left")
    n = list(np.bincount(index, minlength=len(cuts) + 1).astype(np.float64))
    bad = list(np.bincount(index, weights=y, minlength=len(cuts) + 1))
    final_cuts, woe = monotone_woe(cuts, n, bad, min_count=params.min_bin_share * len(v),
                                   smoothing=params.smoothing)
    return FeatureBins(cuts=final_cuts, woe=woe)


def _loss(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean log loss of logits X @ w and the probabilities (one exp and one log1p per row)."""
    t = X @ w
    e = np.exp(-np.abs(t))
    loss = float(np.mean(np.maximum(t, 0.0) + np.log1p(e) - y * t))
    return loss, np.where(t >= 0, 1.0, e) / (1 + e)


def fit_sign_constrained_logistic(z: np.ndarray, y: np.ndarray, iterations: int = 50
                  ) -> tuple[np.ndarray, float]:
    """Maximum likelihood with every coef <= 0 and a free intercept, by projected Newton:
    Newton steps on the free coordinates (inside the bound, or on it with the descent pointing
    inside), projected onto the bound, halved until the loss falls. A handful of iterations
    where L-BFGS-B needed fifty loss evaluations over every training row."""
    n, d = z.shape
    X = np.column_stack([z, np.ones(n)])
    prior = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    w = np.concatenate([np.zeros(d), [np.log(prior / (1 - prior))]])
    loss, p = _loss(X, y, w)
    for _ in range(iterations):
        g = X.T @ (p - y) / n
        free = np.append((w[:d] < 0) | (g[:d] > 0), True)
        if np.abs(g[free]).max() < 1e-9:
            break
        # The whole Hessian, then its free block: a column subset of X is a strided copy
        # whose product took several times longer.
        H = (X * (p * (1 - p))[:, None]).T @ X / n + 1e-10 * np.eye(d + 1)
        step = np.zeros(d + 1)
        step[free] = np.linalg.solve(H[np.ix_(free, free)], g[free])
        taken = projected_step(w, step, d, loss, lambda c: _loss(X, y, c))
        if taken is None:
            break  # no step lowers the loss: converged to the precision of the sums
        cand, new_loss, new_p = taken
        converged = loss - new_loss < 1e-12
        w, loss, p = cand, new_loss, new_p
        if converged:
            break
    return w[:d], float(w[d])


def fit_scorecard(x: np.ndarray, y: np.ndarray, params: ScorecardParams | None = None
                  ) -> Scorecard:
    """Bins and WoE per feature, then the sign-constrained regression; training rows only."""
    params = params or ScorecardParams()
    bins = tuple(monotone_bins(x[:, j], y, params) for j in range(x.shape[1]))
    card = Scorecard(bins=bins, coef=np.zeros(len(bins)), intercept=0.0)
    coef, intercept = fit_sign_constrained_logistic(card.woe(x), y)
    return Scorecard(bins=bins, coef=coef, intercept=intercept)


# ---- both, on a run's split ------------------------------------------------------------------


def _result(logits: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray,
            split: Split, chosen: dict, t0: float) -> BaselineResult:
    """Test metrics after Platt scaling on the validation logits, as the other baselines; the
    history is one entry: what the fit chose and its validation metrics. Only the validation
    and test people are scored: the training people's logits are never needed."""
    z_val, z_test = logits(x[split.val]), logits(x[split.test])
    calibrate = Platt.fit(z_val, y[split.val])
    return BaselineResult(metrics=summary(y[split.test], calibrate(z_test)),
                          history=[{**chosen, **val_metrics(y[split.val], z_val)}],
                          seconds=time.perf_counter() - t0)


def central_references(x: np.ndarray, y: np.ndarray, split: Split, seed: int
                       ) -> dict[str, BaselineResult]:
    """Central gradient boosting and the central WoE scorecard on `x` (every party's prepared
    features side by side); {name: result}."""
    # One BLAS thread: numpy's OpenBLAS otherwise splits each product of the scorecard's
    # Newton steps over both cores, and with the other core busy it took 14 times longer
    # (1.1 s against 0.08 s for the Hessians of 70,000 people).
    with threadpool_limits(limits=1, user_api="blas"):
        return _references(x, y, split, seed)


def _references(x: np.ndarray, y: np.ndarray, split: Split, seed: int
                ) -> dict[str, BaselineResult]:
    x = np.ascontiguousarray(x)  # float32 as the parties prepare it: LightGBM bins it faster
    y = np.asarray(y, dtype=np.float64)
    t0 = time.perf_counter()
    trees = fit_gbdt(x, y, split, seed)
    gbdt = _result(lambda rows: gbdt_logits(trees, rows), x, y, split,
                   {"rounds": int(trees.best_iteration)}, t0)
    t0 = time.perf_counter()
    card = fit_scorecard(x[split.train], y[split.train])
    scorecard = _result(card.logits, x, y, split,
                        {"bins": int(sum(len(b.woe) for b in card.bins)),
                         "features_used": int(np.count_nonzero(card.coef))}, t0)
    log.info("central references: gbdt AUC %.4f (%.2f s), scorecard AUC %.4f (%.2f s)",
             gbdt.metrics["auc"], gbdt.seconds, scorecard.metrics["auc"], scorecard.seconds)
    return {GBDT: gbdt, SCORECARD: scorecard}


def joined_references(data: JoinedData, seed: int) -> dict[str, BaselineResult]:
    """Both references on a vertical run's joined people: every silo's features side by side,
    the federated run's split."""
    x = np.hstack([data.xs[s] for s in data.xs])
    split = Split(*(data.positions(n) for n in ("train", "val", "test")))
    return central_references(x, data.y, split, seed)
