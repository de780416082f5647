"""Boosting the trees on what the silos may see (`model.kind=gbdt`): the mode's resolved
settings, g and h from the randomised-response labels, the base margin, and the loop that grows
`gbdt.trees` trees through server/gbdt.py.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from server import gbdt
from server.config import AuthorityConfig, ConfigError
from server.label_dp import corrected_gradient

log = logging.getLogger(__name__)


def shared_settings(cfg: AuthorityConfig) -> tuple[int, float, float]:
    """gbdt.trees, gbdt.lr, gbdt.reg_lambda: unset in a GbdtConfig of its own, filled in by
    mode when AuthorityConfig is built (server/config.py GBDT_DEFAULTS)."""
    g = cfg.gbdt
    if g.trees is None or g.lr is None or g.reg_lambda is None:
        raise ConfigError("gbdt.trees, gbdt.lr and gbdt.reg_lambda were not resolved")
    return g.trees, g.lr, g.reg_lambda


def depth_of(cfg: AuthorityConfig) -> int:
    """gbdt.depth, filled in by mode like shared_settings' keys."""
    if cfg.gbdt.depth is None:
        raise ConfigError("gbdt.depth was not resolved")
    return cfg.gbdt.depth


def params_of(cfg: AuthorityConfig) -> gbdt.GbdtParams:
    g = cfg.gbdt
    trees, lr, reg_lambda = shared_settings(cfg)
    if g.min_child_weight is None or g.binning not in ("quantile", "uniform"):
        raise ConfigError("gbdt.min_child_weight and gbdt.binning were not resolved")
    binning: Literal["quantile", "uniform"] = "quantile" if g.binning == "quantile" else "uniform"
    # server/gbdt.py's "plain" means g, h travel as numbers; under rr they are the randomised
    # labels' gradients, which is what makes them safe to send.
    return gbdt.GbdtParams(trees=trees, depth=depth_of(cfg), bins=g.bins, lr=lr,
                           lambda_=reg_lambda, min_child_weight=g.min_child_weight,
                           binning=binning)


def rr_gradients(margin: np.ndarray, y_view: np.ndarray, rho: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """g, h the silos see: logistic loss on clean labels when rho = 0 (exactly server/gbdt.py's
    `gradients`), else the forward-corrected loss on the randomised labels (label_dp.py) with
    its expected hessian q'^2 / (q (1 - q)), q = rho + (1 - 2 rho) sigmoid(margin): positive,
    and p (1 - p) at rho = 0. Either is a function of the margin and the RR labels only."""
    if rho == 0.0:
        return gbdt.gradients(margin, y_view)
    s = 0.5 * (1 + np.tanh(0.5 * margin))
    q = np.clip(rho + (1 - 2 * rho) * s, 1e-12, 1 - 1e-12)
    dq = (1 - 2 * rho) * s * (1 - s)
    return corrected_gradient(margin, y_view, rho), dq * dq / (q * (1 - q))


def base_margin(y_view: np.ndarray, rho: float) -> float:
    """Boost from the average: the clean default rate estimated from the RR labels,
    (mean - rho) / (1 - 2 rho); the plain training log-odds when rho = 0."""
    rate = (float(np.mean(y_view)) - rho) / (1 - 2 * rho)
    rate = float(np.clip(rate, 1e-6, 1 - 1e-6))
    return float(np.log(rate / (1 - rate)))


@dataclass(frozen=True)
class Fitted:
    model: gbdt.Model
    # Per tree: g, h of the training rows it was grown on (attribution needs node values).
    grads: tuple[tuple[np.ndarray, np.ndarray], ...]


def fit(silos: Mapping[str, gbdt.SiloEndpoint], y_view: np.ndarray, rho: float,
        params: gbdt.GbdtParams) -> Fitted:
    """`params.trees` trees over the silos' columns on the training rows' RR labels."""
    y_view = np.asarray(y_view, dtype=np.float64)
    base = base_margin(y_view, rho)
    margin = np.full(len(y_view), base)
    trees, grads = [], []
    for t in range(params.trees):
        g, h = rr_gradients(margin, y_view, rho)
        tree, values = gbdt.grow_tree(silos, g, h, t, params)
        margin += values
        trees.append(tree)
        grads.append((g.astype(np.float32), h.astype(np.float32)))
        log.debug("tree %d: %d splits, %d leaves", t, len(tree.splits), len(tree.leaves))
    return Fitted(gbdt.Model(params=params, base_margin=base, trees=tuple(trees)), tuple(grads))
