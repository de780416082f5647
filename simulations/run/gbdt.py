"""In-process vertical gradient-boosted trees (issue 20 item 1): the authority's driver
(server/gbdt.py) talking to `GbdtSilo`s (clients/silo/gbdt.py) through plain method calls
instead of Flower messages. For simulations and tests, and the reference the Flower wiring
(`fedscore run --set model.kind=gbdt`, server/gbdt_run.py) reproduces exactly at
privacy.label_epsilon=inf (bench/gbdt_wired.py).

`protection="plain"` gives the silos g, h in the clear, which reveal the labels (see
clients/protocol/gbdt.py); `"he"` encrypts them (crypto/he.py), about 20 s of one core per
100,000 rows x 10 features of one silo's root histograms (bench/RESULTS.md).

With `binning="quantile"` each silo bins by its own training rows' quantiles, so predicting
needs those rows again (`fitted_on`): the edges are the silo's, not the model's.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from clients.silo.gbdt import Binning, GbdtSilo
from server.gbdt import GbdtParams, Model, fit_trees, predict_trees, tree_values
from server.metrics import log_loss


def _silos(silo_matrices: dict[str, np.ndarray], bins: int, binning: str = "uniform",
           fitted_on: dict[str, np.ndarray] | None = None) -> dict[str, GbdtSilo]:
    """Each silo over its rows, binned by edges fitted on `fitted_on` (default: the same
    rows)."""
    rows = {m.shape[0] for m in silo_matrices.values()}
    if len(rows) != 1:
        raise ValueError("every silo's matrix must have the same aligned rows")
    fitted_on = fitted_on if fitted_on is not None else silo_matrices
    return {name: GbdtSilo(name, x, bins=bins,
                           binning=Binning.fit(fitted_on[name], bins, binning))
            for name, x in silo_matrices.items()}


def fit_vertical(
    silo_matrices: dict[str, np.ndarray], y: np.ndarray, *, trees: int = 50, depth: int = 5,
    bins: int = 32, lr: float = 0.1, lambda_: float = 1.0, min_child_weight: float = 1.0,
    gamma: float = 0.0, protection: Literal["plain", "he"] = "plain",
    binning: Literal["uniform", "quantile"] = "uniform",
) -> Model:
    """Fit on aligned rows: each silo's (rows, features) prepared matrix (u in [-1, 1])."""
    params = GbdtParams(trees=trees, depth=depth, bins=bins, lr=lr, lambda_=lambda_,
                        min_child_weight=min_child_weight, gamma=gamma,
                        protection=protection, binning=binning)
    return fit_trees(_silos(silo_matrices, bins, binning), y, params)


def _scoring_silos(model: Model, silo_matrices: dict[str, np.ndarray],
                   fitted_on: dict[str, np.ndarray] | None) -> dict[str, GbdtSilo]:
    if model.params.binning == "quantile" and fitted_on is None:
        raise ValueError("quantile bins are the silos' own: pass the training matrices")
    return _silos(silo_matrices, model.params.bins, model.params.binning, fitted_on)


def predict_vertical(model: Model, silo_matrices: dict[str, np.ndarray],
                     fitted_on: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Probabilities of default for the aligned rows of `silo_matrices` (`fitted_on`: the
    training matrices, needed with quantile bins)."""
    silos = _scoring_silos(model, silo_matrices, fitted_on)
    rows = next(iter(silo_matrices.values())).shape[0]
    return 1.0 / (1.0 + np.exp(-predict_trees(model, silos, rows)))


def staged_margins(model: Model, silo_matrices: dict[str, np.ndarray],
                   fitted_on: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(trees + 1, rows): the margin after 0, 1, ..., all trees (for choosing the number of
    trees on validation people)."""
    silos = _scoring_silos(model, silo_matrices, fitted_on)
    rows = next(iter(silo_matrices.values())).shape[0]
    out = np.empty((len(model.trees) + 1, rows))
    out[0] = model.base_margin
    for t, values in enumerate(tree_values(model, silos, rows)):  # in the run's order
        out[t + 1] = out[t] + values
    return out


def best_count(model: Model, val_matrices: dict[str, np.ndarray], y_val: np.ndarray,
               fitted_on: dict[str, np.ndarray] | None = None) -> int:
    """The number of trees with the best validation log loss (the first of equals), as the
    run keeps (server/gbdt_scores.py `keep_best`)."""
    margins = staged_margins(model, val_matrices, fitted_on)[1:]
    losses = [log_loss(y_val, 1 / (1 + np.exp(-z))) for z in margins]
    return int(np.argmin(losses)) + 1


def truncated(model: Model, trees: int) -> Model:
    return Model(params=model.params, base_margin=model.base_margin, trees=model.trees[:trees])
