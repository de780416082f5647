"""Messages of the vertical WoE scorecard (issue 20 item 2), beside those of the vertical trees.

Like clients/protocol/gbdt.py, these dataclasses are the message boundary of the protocol
(server/scorecard.py drives it, clients/silo/scorecard.py answers): called in process
(simulations/run/scorecard.py), or carried by the Flower messages below in `fedscore run
--set model.kind=scorecard` (server/scorecard_run.py sends them, clients/silo/
scorecard_handlers.py answers).

The label-dependent sums travel on the trees' path, unchanged: the authority sends every silo
`Gradients` (or, protected, `EncryptedGradients`) and a `HistogramRequest` for the root node
only, and reads the per-(feature, bin) sums of the reply. With g = y and h = 1 these are each
bin's defaulters and people, from which the authority merges monotone bins and computes WoE;
with g = p - y and h = p (1 - p) they are what the regression's gradient and diagonal Hessian
need. Under encryption a silo never sees a row's label or gradient.

Then the authority tells each silo its merged bins (`WoeTables`: cut points as the silo's own
pre-bin indices, WoE per merged bin) and asks for partial logits (`PartialLogitsRequest` with
one coefficient per feature -> `PartialLogits`): per row, sum_f beta_f * WoE_f(bin of the row).
That is a per-row contribution, as the MLP's `sum` mode sends per-row outputs, and it is what
this protocol discloses to the authority beyond the histograms: the regression asks for a new
set of coefficients at every step, and the partial logits are linear in them, so once it has
asked for as many independent coefficient vectors as the silo has features, the authority can
solve for each row's WoE per feature, that is each row's merged bin. The authority never learns
a threshold in the silo's units. At the end `PointsTables` gives the silo the points of each of
its merged bins, from which it writes its own scorecard table with its own ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from clients.protocol.gbdt import SiloEndpoint

# The Flower messages of a run's scorecard, after the trees' `query.gbdt_start` (which fixes the
# run, the pre-bins and the training positions) and beside their `train.gbdt_level` (root node
# only: the counts, then one root histogram per regression step):
WOE = "train.scorecard_woe"  # WoeTables -> acknowledged
LOGITS = "train.scorecard_logits"  # PartialLogitsRequest -> PartialLogits (training rows)
# Scoring: the partial logits of any aligned positions; with the points tables, the silo also
# writes its `scorecard.csv` and, when asked, returns its reason codes in logit units.
SCORE = "query.scorecard_score"
TABLE_FILE = "scorecard.csv"


@dataclass(frozen=True, kw_only=True)
class FeatureWoe:
    """One feature's merged bins: merged bin i holds the silo's pre-bins b with
    cuts[i-1] < b <= cuts[i] (open at both ends), and its WoE is woe[i]."""

    cuts: np.ndarray  # (k - 1,) int64, ascending pre-bin indices
    woe: np.ndarray  # (k,) float64


@dataclass(frozen=True, kw_only=True)
class WoeTables:
    """Authority -> a silo, once after binning: one table per feature of the silo, in order."""

    features: tuple[FeatureWoe, ...]


@dataclass(frozen=True, kw_only=True)
class PartialLogitsRequest:
    """Authority -> a silo: the current coefficient of each of its features."""

    round: int
    weights: np.ndarray  # (features,) float64, each <= 0


@dataclass(frozen=True, kw_only=True)
class PartialLogits:
    """A silo -> the authority: per row, sum_f weights[f] * WoE_f(row's merged bin)."""

    silo: str
    round: int
    logits: np.ndarray  # (rows,) float64


@dataclass(frozen=True, kw_only=True)
class PointsTables:
    """Authority -> a silo, at the end: the score points of each merged bin of each feature
    (same shapes as the WoE tables); the base points stay with the authority."""

    points: tuple[np.ndarray, ...]


class ScorecardEndpoint(SiloEndpoint, Protocol):
    """What the authority can ask a silo for the scorecard: the trees' histogram messages
    (root node only) plus the scorecard's own."""

    def woe_tables(self, msg: WoeTables) -> None: ...

    def partial_logits(self, msg: PartialLogitsRequest) -> PartialLogits: ...

    def points_tables(self, msg: PointsTables) -> None: ...


def pack_tables(features: tuple[FeatureWoe, ...]) -> dict[str, np.ndarray]:
    """A silo's tables as three flat arrays (cuts and WoE concatenated, cuts per feature)."""
    return {"cuts": np.concatenate([np.asarray(t.cuts, dtype=np.int64) for t in features]),
            "sizes": np.array([len(t.cuts) for t in features], dtype=np.int64),
            "woe": np.concatenate([np.asarray(t.woe, dtype=np.float64) for t in features])}


def unpack_tables(cuts: np.ndarray, sizes: np.ndarray, woe: np.ndarray
                  ) -> tuple[FeatureWoe, ...]:
    """`pack_tables` undone; ValueError when the arrays do not fit together."""
    if (sizes < 0).any() or sizes.sum() != len(cuts) or len(woe) != len(cuts) + len(sizes):
        raise ValueError("WoE tables: one more WoE value than cuts per feature")
    if not len(sizes):
        return ()
    cut_at = np.cumsum(sizes)[:-1]
    woe_at = np.cumsum(sizes + 1)[:-1]
    return tuple(FeatureWoe(cuts=c, woe=w) for c, w in
                 zip(np.split(cuts, cut_at), np.split(woe, woe_at), strict=True))
