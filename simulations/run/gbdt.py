"""In-process vertical gradient-boosted trees (issue 20 item 1): the authority's driver
(server/gbdt.py) talking to `GbdtSilo`s (clients/silo/gbdt.py) through plain method calls
instead of Flower messages. For simulations and tests, and the reference the Flower wiring
(`fedscore run --set model.kind=gbdt`, server/gbdt_run.py) reproduces exactly at
privacy.label_epsilon=inf (bench/gbdt_wired.py).

`protection="plain"` gives the silos g, h in the clear, which reveal the labels (see
clients/protocol/gbdt.py); `"he"` encrypts them (crypto/he.py), about 20 s of one core per
100,000 rows x 10 features of one silo's root histograms (bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from clients.silo.gbdt import GbdtSilo
from server.gbdt import GbdtParams, Model, fit_trees, predict_trees


def _silos(silo_matrices: dict[str, np.ndarray], bins: int) -> dict[str, GbdtSilo]:
    rows = {m.shape[0] for m in silo_matrices.values()}
    if len(rows) != 1:
        raise ValueError("every silo's matrix must have the same aligned rows")
    return {name: GbdtSilo(name, x, bins=bins) for name, x in silo_matrices.items()}


def fit_vertical(
    silo_matrices: dict[str, np.ndarray], y: np.ndarray, *, trees: int = 50, depth: int = 5,
    bins: int = 32, lr: float = 0.1, lambda_: float = 1.0, min_child_weight: float = 1.0,
    gamma: float = 0.0, protection: Literal["plain", "he"] = "plain",
) -> Model:
    """Fit on aligned rows: each silo's (rows, features) prepared matrix (u in [-1, 1])."""
    params = GbdtParams(trees=trees, depth=depth, bins=bins, lr=lr, lambda_=lambda_,
                        min_child_weight=min_child_weight, gamma=gamma,
                        protection=protection)
    return fit_trees(_silos(silo_matrices, bins), y, params)


def predict_vertical(model: Model, silo_matrices: dict[str, np.ndarray]) -> np.ndarray:
    """Probabilities of default for the aligned rows of `silo_matrices`."""
    silos = _silos(silo_matrices, model.params.bins)
    rows = next(iter(silo_matrices.values())).shape[0]
    return 1.0 / (1.0 + np.exp(-predict_trees(model, silos, rows)))
