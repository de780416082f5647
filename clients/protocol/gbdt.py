"""Messages of vertical gradient-boosted trees, SecureBoost-style (issue 20 item 1).

These dataclasses are the message boundary of the protocol (server/gbdt.py drives it,
clients/silo/gbdt.py answers): in process (simulations/run/gbdt.py), or carried by Flower
messages in `fedscore run --set model.kind=gbdt` (server/gbdt_run.py and
clients/silo/gbdt_handlers.py: one message per silo for all of a level's histogram requests,
another for its split requests, the gradients riding on the root's).

Per tree the authority (label holder) sends every silo the rows' gradients (`Gradients`);
then, level by level, the rows of each open node (`HistogramRequest`), and each silo answers
with per-(feature, bin) sums of g and h (`HistogramReply`: shape (features, bins), nothing per
row). The authority picks the best split over all silos and asks only the owning silo for the
partition of that node's rows (`SplitRequest` -> `SplitReply`: one left/right bit per row of
the node, the only per-row thing a silo ever sends). The authority learns (silo, feature index,
bin) of each split; the silo's own mapping from its raw column to the bin (its declared ranges
and transforms) never leaves it. For scoring, `RouteRequest` -> `RouteReply` gives the same
left/right bits for the silo's splits on new rows.

Labels never reach a silo; the only per-row arrays it receives are g and h. But plain g, h
reveal the labels: for logistic loss g = p - y, so y = 1 exactly when g < 0. The plain mode
(`Gradients` of clean labels) is therefore for simulation and tests only. A run sends
`Gradients` computed from the randomised-response labels (gbdt.protection=rr: post-processing
of eps_label, whose ledger line is the whole account); `EncryptedGradients` (crypto/he.py: the
silo then returns `EncryptedNodeHistogram`s) run in process only so far. Even under encryption
the authority learns each node's partition (as in SecureBoost) and the decrypted per-bin sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from crypto.he import EncryptedPairs, EncryptedSums, PublicHe

# What a silo's trees bin in a run (clients/silo/gbdt_handlers.py): its prepared matrix divided
# by this. The prepared matrix is standardised ((u - mean) / scale, clients/silo/data.py
# `Preparation`), not on the [-1, 1] that GbdtSilo's equal-width bins span: on the default
# population 12-14 % of the values fell into the two end bins. Divided by 4, the bins span
# +-4 standard units: a fixed map that reads no data. Measured in process (50 trees of depth
# 5, 32 bins, clean labels; test AUC), default population (100,000 people): x 0.8454, x/2
# 0.8517, x/3 0.8515, x/4 0.8541, x/5 0.8502, x/6 0.8517, tanh(x/2) 0.8531, central LightGBM
# 0.8542; UCI (30,000): x 0.7920, x/2 0.7920, x/3 0.7902, x/4 0.7872, x/6 0.7867, central
# LightGBM 0.7955. Every scale beats x on the first; on UCI the choice moves AUC by 0.005,
# about the test set's standard error. Since then the SecureBoost trees bin by each silo's own
# quantiles by default (gbdt.binning=quantile, clients/silo/gbdt.py `Binning`), where this scale
# changes nothing; it still serves gbdt.binning=uniform. The DP trees keep DP_UNITS.
STANDARD_UNITS = 4.0
# What the DP trees bin (server/gbdt_dp_run.py sends it with query.gbdt_start): the prepared
# matrix as is. Their thresholds are drawn uniformly over the bins, not chosen on the data, so
# bins spanning +-4 standard units leave most random thresholds in the tails, cutting nobody.
# Measured at eps 1 (bench/RESULTS.md "DP vertical trees in fedscore run"): UCI in process,
# seeds 0-2, x 0.7715, x/2 0.7667, x/4 0.7475; in `fedscore run`, UCI x 0.7612 against x/4
# 0.7442, the default population x 0.8435 against x/4 0.8468 (one split each).
DP_UNITS = 1.0

# The Flower messages of a run's trees (server/gbdt_run.py sends them, clients/silo/
# gbdt_handlers.py answers): start on the training positions, a level's histograms (with the
# tree's g, h on the root's), a level's partitions from the silos owning its splits, scoring.
START = "query.gbdt_start"
LEVEL = "train.gbdt_level"
SPLIT = "train.gbdt_split"
ROUTE = "query.gbdt_route"
# Reason codes k -> the silo's consent (checked against its policy `explain`) and its
# feature names with the feature of each column (server/gbdt_reasons.py says why the
# authority, not the silo, ranks the credits).
EXPLAIN = "query.gbdt_explain"


@dataclass(frozen=True, kw_only=True)
class Gradients:
    """Authority -> every silo, once per tree: per-row gradient and hessian (see the module
    docstring: plain values reveal labels)."""

    tree: int
    g: np.ndarray  # (rows,) float64
    h: np.ndarray  # (rows,) float64


@dataclass(frozen=True, kw_only=True)
class EncryptedGradients:
    """Authority -> every silo, once per tree under `protection="he"`: (g, h) under BFV
    (crypto/he.py) with the public and rotation keys, never the secret key. Sending the keys
    with every tree keeps the in-process protocol stateless; the wiring can send them once."""

    tree: int
    public: PublicHe
    pairs: EncryptedPairs


@dataclass(frozen=True, kw_only=True)
class NodeRows:
    node: int
    rows: np.ndarray  # positions 0..M-1 of the shared order, int64, ascending


@dataclass(frozen=True, kw_only=True)
class HistogramRequest:
    """Authority -> every silo, once per level: the open nodes and their rows."""

    tree: int
    nodes: tuple[NodeRows, ...]


@dataclass(frozen=True, kw_only=True)
class NodeHistogram:
    node: int
    g: np.ndarray  # (features, bins) sums of g per bin of each of the silo's features
    h: np.ndarray  # (features, bins) sums of h


@dataclass(frozen=True, kw_only=True)
class EncryptedNodeHistogram:
    """The same sums under encryption: only the authority's secret key opens them."""

    node: int
    sums: EncryptedSums


@dataclass(frozen=True, kw_only=True)
class HistogramReply:
    silo: str
    tree: int
    nodes: tuple[NodeHistogram | EncryptedNodeHistogram, ...]


@dataclass(frozen=True, kw_only=True)
class SplitRequest:
    """Authority -> the silo that owns the chosen split: partition this node's rows."""

    tree: int
    node: int
    feature: int  # the silo's own column index
    bin: int  # a row goes left when its bin <= this one
    rows: np.ndarray


@dataclass(frozen=True, kw_only=True)
class SplitReply:
    silo: str
    tree: int
    node: int
    left: np.ndarray  # (len(rows),) bool, in the order of the request's rows


@dataclass(frozen=True, kw_only=True)
class RouteRequest:
    """Scoring: the silo's splits as (feature, bin) pairs, evaluated on its rows to be scored."""

    splits: tuple[tuple[int, int], ...]


@dataclass(frozen=True, kw_only=True)
class RouteReply:
    silo: str
    left: np.ndarray  # (len(splits), rows) bool


class SiloEndpoint(Protocol):
    """What the authority can ask a silo during training and scoring."""

    @property
    def features(self) -> int: ...

    def gradients(self, msg: Gradients | EncryptedGradients) -> None: ...

    def histograms(self, msg: HistogramRequest) -> HistogramReply: ...

    def split(self, msg: SplitRequest) -> SplitReply: ...

    def route(self, msg: RouteRequest) -> RouteReply: ...
