"""A silo's side of the vertical WoE scorecard (issue 20 item 2; messages in
clients/protocol/scorecard.py). `ScorecardSilo` answers in process, and behind the Flower
messages of clients/silo/scorecard_handlers.py.

It is a `GbdtSilo` (clients/silo/gbdt.py): the same data-independent pre-bins (equal width over
the prepared range [-1, 1]) and the same per-bin sums, plain or under BFV, which is how the
authority gets each bin's people and defaulters without the silo seeing a label. On top of that
it keeps the merged bins the authority chose (as ranges of its own pre-bins), answers partial
logits, and holds its part of the points table: the ranges of each bin in its own units stay
here, the authority only knows pre-bin indices.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from clients.protocol.reasons import MAX_REASONS, top_reasons_matrix
from clients.protocol.scorecard import (
    PartialLogits,
    PartialLogitsRequest,
    PointsTables,
    WoeTables,
)
from clients.silo.data import Preparation
from clients.silo.gbdt import GbdtSilo

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("feature", "column", "bin", "pre_bins", "low", "high", "raw_low", "raw_high",
                 "woe", "points")
# (feature index, prepared values) -> the same values in the column's own units (NaN: none)
RawUnits = Callable[[int, np.ndarray], np.ndarray]


def raw_units(prep: Preparation) -> RawUnits:
    """The inverse of a silo's preparation for its numeric columns: standardisation, the
    linear map from the clip range, and the column's transform. Prepared values beyond the
    clip range map to its ends (the preparation clipped them there), infinite ones stay
    infinite; indicator and category columns have no raw range (NaN)."""
    def to_raw(feature: int, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if feature >= len(prep.numeric):
            return np.full(x.shape, np.nan)
        u = np.clip(x * prep.scale[feature] + prep.mean[feature], -1.0, 1.0)
        low, high = prep.low[feature], prep.high[feature]
        t = u * (high - low) / 2 + (low + high) / 2
        how = prep.transforms[feature]
        if how == "log1p":
            t = np.expm1(t)
        elif how == "signed_log":
            t = np.sign(t) * np.expm1(np.abs(t))
        return np.where(np.isinf(x), x, t)
    return to_raw


class ScorecardSilo(GbdtSilo):
    """One silo's binned rows, its merged bins and WoE, and its points per bin.

    `columns` names the silo's features in its table (default "x0", "x1", ...); `low`/`high`
    in the table are on the prepared scale (the pre-bins' edges, the end bins open), and
    `raw_low`/`raw_high` in the column's own units when `to_raw` (e.g. `raw_units` of the
    silo's preparation) is given. `x` is the prepared matrix divided by `units` (the pre-bins
    are equal-width over [-1, 1] of x, so over [-units, units] of the prepared scale).
    """

    def __init__(self, name: str, x: np.ndarray, *, bins: int,
                 columns: Sequence[str] | None = None, to_raw: RawUnits | None = None,
                 units: float = 1.0) -> None:
        super().__init__(name, x, bins=bins)
        self._to_raw = to_raw
        self._units = units
        self.columns = list(columns) if columns is not None else [
            f"x{f}" for f in range(self.features)]
        if len(self.columns) != self.features:
            raise ValueError("one column name per feature")
        self._tables: WoeTables | None = None
        self._merged: np.ndarray | None = None  # (rows, features) merged bin of each row
        self._points: tuple[np.ndarray, ...] | None = None

    def woe_tables(self, msg: WoeTables) -> None:
        if len(msg.features) != self.features:
            raise ValueError("one WoE table per feature")
        merged = np.empty(self._bin_idx.shape, dtype=np.int64)
        for f, table in enumerate(msg.features):
            cuts = np.asarray(table.cuts)
            if (len(table.woe) != len(cuts) + 1 or np.any(np.diff(cuts) <= 0)
                    or (len(cuts) and (cuts[0] < 0 or cuts[-1] >= self.bins - 1))):
                raise ValueError(f"feature {f}: cuts must be ascending pre-bins, one fewer "
                                 "than WoE values")
            merged[:, f] = np.searchsorted(cuts, self._bin_idx[:, f], side="left")
        self._tables, self._merged, self._points = msg, merged, None

    def partial_logits(self, msg: PartialLogitsRequest) -> PartialLogits:
        """Per row, sum_f weights[f] * WoE_f(bin): one per-row contribution, as the MLP's sum
        mode sends its per-row outputs (what this discloses: clients/protocol/scorecard.py)."""
        tables, merged = self._require_tables()
        weights = np.asarray(msg.weights, dtype=np.float64)
        if weights.shape != (self.features,):
            raise ValueError("one weight per feature")
        logits = np.zeros(merged.shape[0])
        for f, table in enumerate(tables.features):
            if weights[f] != 0.0:
                logits += weights[f] * np.asarray(table.woe)[merged[:, f]]
        return PartialLogits(silo=self.name, round=msg.round, logits=logits)

    def points_tables(self, msg: PointsTables) -> None:
        tables, _ = self._require_tables()
        if [len(p) for p in msg.points] != [len(t.woe) for t in tables.features]:
            raise ValueError("points must have the WoE tables' shapes")
        self._points = tuple(np.asarray(p, dtype=np.float64) for p in msg.points)

    def merged_bins(self) -> list[int]:
        """The number of merged bins of each feature (the shapes points must have)."""
        tables, _ = self._require_tables()
        return [len(t.woe) for t in tables.features]

    def _require_tables(self) -> tuple[WoeTables, np.ndarray]:
        if self._tables is None or self._merged is None:
            raise ValueError("no WoE tables yet")
        return self._tables, self._merged

    def _require_points(self) -> tuple[np.ndarray, ...]:
        if self._points is None:
            raise ValueError("no points yet")
        return self._points

    def row_points(self) -> np.ndarray:
        """(rows, features) points of each row's bin of each feature."""
        points = self._require_points()
        _, merged = self._require_tables()
        return np.column_stack([points[f][merged[:, f]] for f in range(self.features)])

    def reasons(self, k: int = MAX_REASONS) -> tuple[np.ndarray, np.ndarray]:
        """Per row, up to k features whose bin costs the most points against the best bin of
        that feature: (feature index, points lost as a negative number), each (rows, k);
        empty slots hold -1 and NaN (clients/protocol/reasons.py's ranking)."""
        best = np.array([p.max() for p in self._require_points()])
        return top_reasons_matrix(self.row_points() - best, k)

    def explain(self, weights: np.ndarray, k: int = MAX_REASONS
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Reason codes in logit units under `weights` (clients/silo/explain.py's format):
        per row its partial logit's excess over the best bins' (delta), the k features whose
        bins add the most to it (index, -1 for none) and what each adds (share, 0 for none),
        and the best bins' partial logit (reference). Points are -factor * a * logits, so
        the ranking is `reasons`'s: the bins that cost the most points."""
        tables, merged = self._require_tables()
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.features,):
            raise ValueError("one weight per feature")
        per_bin = [weights[f] * np.asarray(t.woe) for f, t in enumerate(tables.features)]
        best = np.array([p.min() for p in per_bin])
        excess = np.column_stack([per_bin[f][merged[:, f]] - best[f]
                                  for f in range(self.features)])
        index, lost = top_reasons_matrix(-excess, k)
        return excess.sum(axis=1), index, np.nan_to_num(-lost, nan=0.0), float(best.sum())

    def table(self) -> list[dict[str, object]]:
        """The silo's part of the points table, one entry per (feature, merged bin)."""
        tables, _ = self._require_tables()
        points = self._require_points()
        out: list[dict[str, object]] = []
        for f, t in enumerate(tables.features):
            highs = [int(c) for c in t.cuts] + [self.bins - 1]
            lows = [0] + [h + 1 for h in highs[:-1]]
            low = self._units * np.array([-math.inf if lo == 0 else -1.0 + 2.0 * lo / self.bins
                                          for lo in lows])
            high = self._units * np.array([math.inf if hi == self.bins - 1
                                           else -1.0 + 2.0 * (hi + 1) / self.bins
                                           for hi in highs])
            raw = ((self._to_raw(f, low), self._to_raw(f, high)) if self._to_raw is not None
                   else (np.full(len(low), np.nan), np.full(len(low), np.nan)))
            out += [{"feature": f, "column": self.columns[f], "bin": b,
                     "pre_bins": f"{lows[b]}..{highs[b]}", "low": float(low[b]),
                     "high": float(high[b]), "raw_low": float(raw[0][b]),
                     "raw_high": float(raw[1][b]), "woe": float(t.woe[b]),
                     "points": float(points[f][b])} for b in range(len(t.woe))]
        return out

    def write_table(self, path: Path) -> None:
        """`scorecard.csv`: a row per (feature, bin) with its range, WoE and points. A
        prepared value lies in [low, high) (the prepared scale, whatever `units`)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows(self.table())
        log.info("silo %s: scorecard table written (%d bins)", self.name, len(self.table()))
