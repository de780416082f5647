"""A silo's side of vertical gradient-boosted trees (issue 20 item 1; messages in
clients/protocol/gbdt.py). `GbdtSilo` answers the protocol's messages: in process
(simulations/run/gbdt.py) or behind the silo's Flower handlers (clients/silo/gbdt_handlers.py).

Two binnings (`Binning`):
- "uniform", data-independent: `bins` equal-width bins over [-1, 1] (the caller scales its
  prepared matrix onto that range, clients/protocol/gbdt.py STANDARD_UNITS), so choosing the
  edges reads no data and costs no privacy. Values outside [-1, 1] fall into the end bins.
  What the DP trees must use: equal width on a declared range is what DP tree papers (e.g.
  Maddock et al., CCS 2022) use, since data-dependent edges would be a release needing its
  own DP accounting.
- "quantile", what LightGBM and XGBoost do, computed by each silo over its OWN column on the
  training rows (`quantile_edges`): the edges stay in the silo like every threshold, and the
  authority still learns only (silo, column, bin index), but that index is now a rank (about
  the share of training people at or below the threshold) instead of a position on a fixed
  scale. For the non-private trees only (their model epsilon is infinite anyway;
  docs/threat-model.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from clients.protocol.gbdt import (
    EncryptedGradients,
    EncryptedNodeHistogram,
    Gradients,
    HistogramReply,
    HistogramRequest,
    NodeHistogram,
    RouteReply,
    RouteRequest,
    SplitReply,
    SplitRequest,
)
from crypto import he

log = logging.getLogger(__name__)

MAX_BINS = 256  # bin indices are uint8
BINNINGS = ("uniform", "quantile")


def bin_index(x: np.ndarray, bins: int) -> np.ndarray:
    """(rows, features) uint8 bin of each value: equal width over [-1, 1], ends clipped.

    A NaN (there should be none after preparation) is refused rather than binned silently.
    """
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins must lie in [2, {MAX_BINS}]")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("x must be (rows, features)")
    if np.isnan(x).any():
        raise ValueError("x has missing values: prepare the table first")
    scaled = np.floor((x + 1.0) * (bins / 2.0))
    return np.clip(scaled, 0, bins - 1).astype(np.uint8)


def quantile_edges(column: np.ndarray, bins: int) -> np.ndarray:
    """Ascending inner edges of one column, at most bins - 1: bin i holds
    edges[i-1] < x <= edges[i]. A column with at most `bins` distinct values gets one bin per
    value (edges at the midpoints, as LightGBM does for few values), so no quantile merges two
    values; otherwise the distinct quantiles at evenly spaced levels."""
    values = np.unique(np.asarray(column, dtype=np.float64))
    if np.isnan(values).any():
        raise ValueError("x has missing values: prepare the table first")
    if len(values) <= bins:
        return (values[:-1] + values[1:]) / 2.0
    levels = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.unique(np.quantile(column, levels, method="inverted_cdf"))


@dataclass(frozen=True)
class Binning:
    """A silo's map from values to bin indices: equal width (`edges` None) or its own
    per-column edges. Kept by the silo: the edges are thresholds in its own units."""

    bins: int
    edges: tuple[np.ndarray, ...] | None = None

    @classmethod
    def fit(cls, x: np.ndarray, bins: int, kind: str = "uniform") -> Binning:
        """`kind` "uniform" reads nothing; "quantile" reads the columns of `x` (the silo's
        training rows)."""
        if kind not in BINNINGS:
            raise ValueError(f"binning must be one of {', '.join(BINNINGS)}")
        if not 2 <= bins <= MAX_BINS:
            raise ValueError(f"bins must lie in [2, {MAX_BINS}]")
        if kind == "uniform":
            return cls(bins)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError("x must be (rows, features)")
        return cls(bins, tuple(quantile_edges(x[:, f], bins) for f in range(x.shape[1])))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(rows, features) uint8 bin of each value."""
        if self.edges is None:
            return bin_index(x, self.bins)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.edges):
            raise ValueError(f"x must be (rows, {len(self.edges)})")
        if np.isnan(x).any():
            raise ValueError("x has missing values: prepare the table first")
        out = np.empty(x.shape, dtype=np.uint8)
        for f, edges in enumerate(self.edges):
            out[:, f] = np.searchsorted(edges, x[:, f], side="left")
        return out


def histograms(
    bin_idx: np.ndarray, rows: np.ndarray, g: np.ndarray, h: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sums of g and of h per (feature, bin) over `rows`; each (features, bins) float64.

    One bincount per feature over the node's rows (vectorised over rows; the loop is over
    columns): 1.4-1.8x faster than a single bincount on feature * bins + bin, which must
    repeat the weights and widen the indices. Each bin receives its rows in row order whatever
    the other features are, so a silo's sums equal those of the joined matrix bit for bit (the
    lossless test relies on it).
    """
    sub = bin_idx[rows]
    g_rows, h_rows = g[rows], h[rows]
    features = sub.shape[1]
    g_out, h_out = np.empty((features, bins)), np.empty((features, bins))
    for f in range(features):
        g_out[f] = np.bincount(sub[:, f], weights=g_rows, minlength=bins)
        h_out[f] = np.bincount(sub[:, f], weights=h_rows, minlength=bins)
    return g_out, h_out


def split_rows(bin_idx: np.ndarray, rows: np.ndarray, feature: int, bin: int) -> np.ndarray:
    """Left mask over `rows`: a row goes left when its bin is <= `bin`."""
    return bin_idx[rows, feature] <= bin


class GbdtSilo:
    """One silo's state for training or scoring: its binned matrix and the tree's gradients.

    The authority's requests name the silo's own column index and a bin; the threshold in the
    silo's raw units (through its declared range) stays here.
    """

    def __init__(self, name: str, x: np.ndarray, *, bins: int,
                 binning: Binning | None = None) -> None:
        """`binning` (fitted by the silo, e.g. on its training rows) defaults to equal width."""
        if binning is not None and binning.bins != bins:
            raise ValueError("the binning has another bin count")
        self.name = name
        self.bins = bins
        self.binning = binning or Binning(bins)
        self._bin_idx = self.binning.apply(x)
        self._g: np.ndarray | None = None
        self._h: np.ndarray | None = None
        self._encrypted: EncryptedGradients | None = None
        self._tree = -1

    @property
    def features(self) -> int:
        return int(self._bin_idx.shape[1])

    @property
    def rows(self) -> int:
        return int(self._bin_idx.shape[0])

    def gradients(self, msg: Gradients | EncryptedGradients) -> None:
        rows = self._bin_idx.shape[0]
        if isinstance(msg, EncryptedGradients):
            if msg.pairs.rows != rows or msg.public.params.bins != self.bins:
                raise ValueError("encrypted gradients for other rows or another bin count")
            self._tree, self._encrypted, self._g, self._h = msg.tree, msg, None, None
            return
        if msg.g.shape != (rows,) or msg.h.shape != msg.g.shape:
            raise ValueError("gradients must have one value per row")
        self._tree, self._encrypted, self._g, self._h = msg.tree, None, msg.g, msg.h

    def histograms(self, msg: HistogramRequest) -> HistogramReply:
        if msg.tree != self._tree:
            raise ValueError(f"no gradients for tree {msg.tree}")
        sums: list[NodeHistogram | EncryptedNodeHistogram] = []
        for node in msg.nodes:
            if self._encrypted is not None:
                sums.append(self._encrypted_sums(node.node, node.rows, self._encrypted))
                continue
            if self._g is None or self._h is None:
                raise ValueError(f"no gradients for tree {msg.tree}")
            gs, hs = histograms(self._bin_idx, node.rows, self._g, self._h, self.bins)
            sums.append(NodeHistogram(node=node.node, g=gs, h=hs))
        return HistogramReply(silo=self.name, tree=msg.tree, nodes=tuple(sums))

    def _encrypted_sums(
        self, node: int, rows: np.ndarray, msg: EncryptedGradients
    ) -> EncryptedNodeHistogram:
        mask = np.zeros(self._bin_idx.shape[0], dtype=bool)
        mask[rows] = True
        sums = he.bin_sums(msg.public, pairs=msg.pairs, bins=self._bin_idx.T, mask=mask)
        return EncryptedNodeHistogram(node=node, sums=sums)

    def split(self, msg: SplitRequest) -> SplitReply:
        self._check(msg.feature, msg.bin)
        left = split_rows(self._bin_idx, msg.rows, msg.feature, msg.bin)
        return SplitReply(silo=self.name, tree=msg.tree, node=msg.node, left=left)

    def route(self, msg: RouteRequest) -> RouteReply:
        left = np.zeros((len(msg.splits), self._bin_idx.shape[0]), dtype=bool)
        for i, (feature, bin) in enumerate(msg.splits):
            self._check(feature, bin)
            left[i] = self._bin_idx[:, feature] <= bin
        return RouteReply(silo=self.name, left=left)

    def _check(self, feature: int, bin: int) -> None:
        if not (0 <= feature < self.features and 0 <= bin < self.bins - 1):
            raise ValueError("split outside this silo's features or bins")
