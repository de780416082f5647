"""In-process vertical WoE scorecard (issue 20 item 2): the authority's driver
(server/scorecard.py) talking to `ScorecardSilo`s (clients/silo/scorecard.py) through plain
method calls instead of Flower messages, as simulations/run/gbdt.py does for the trees. For
simulations and tests, and the reference the Flower wiring of `fedscore run --set
model.kind=scorecard` (server/scorecard_run.py) reproduces (tests/test_scorecard_wire.py).

`protection="plain"` gives the silos the labels (as g = y) and p - y in the clear;
`"he"` encrypts them (crypto/he.py). The central reference on the joined matrix is
simulations/analysis/references.py's `fit_scorecard`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from clients.protocol.reasons import MAX_REASONS, top_reasons_matrix
from clients.protocol.scorecard import TABLE_FILE
from clients.silo.scorecard import RawUnits, ScorecardSilo
from server.config import ScoreConfig
from server.scorecard import (
    ScorecardParams,
    VerticalScorecard,
    fit_scorecard,
    predict_margins,
    send_points,
)
from server.scoring import SCORE_MAX, SCORE_MIN


def silos_for(silo_matrices: Mapping[str, np.ndarray], bins: int,
              columns: Mapping[str, list[str]] | None = None,
              to_raw: Mapping[str, RawUnits] | None = None) -> dict[str, ScorecardSilo]:
    """A silo per matrix; `columns` and `to_raw` (e.g. `raw_units` of each silo's
    preparation) name its columns and give its tables' ranges in its own units."""
    rows = {m.shape[0] for m in silo_matrices.values()}
    if len(rows) != 1:
        raise ValueError("every silo's matrix must have the same aligned rows")
    columns, to_raw = columns or {}, to_raw or {}
    return {name: ScorecardSilo(name, x, bins=bins, columns=columns.get(name),
                                to_raw=to_raw.get(name))
            for name, x in silo_matrices.items()}


def fit_vertical_scorecard(
    silo_matrices: Mapping[str, np.ndarray], y: np.ndarray, *, bins: int = 32,
    min_bin_share: float = 0.05, smoothing: float = 0.5, iterations: int = 50,
    protection: Literal["plain", "he"] = "plain", rho: float = 0.0,
) -> VerticalScorecard:
    """Fit on aligned rows: each silo's (rows, features) prepared matrix (u in [-1, 1]); y the
    labels the silos may see, randomised response with flip probability `rho` if > 0 (the
    Flower wiring's `rr` protection, server/scorecard_run.py)."""
    params = ScorecardParams(bins=bins, min_bin_share=min_bin_share, smoothing=smoothing,
                             iterations=iterations, protection=protection)
    return fit_scorecard(silos_for(silo_matrices, bins), y, params, rho)


def predict_vertical_scorecard(model: VerticalScorecard,
                               silo_matrices: Mapping[str, np.ndarray]) -> np.ndarray:
    """Probabilities of default for the aligned rows of `silo_matrices`."""
    silos = silos_for(silo_matrices, model.params.bins)
    rows = next(iter(silo_matrices.values())).shape[0]
    return 1.0 / (1.0 + np.exp(-predict_margins(model, silos, rows)))


def scored_silos(model: VerticalScorecard, silo_matrices: Mapping[str, np.ndarray],
                 cfg: ScoreConfig, columns: Mapping[str, list[str]] | None = None,
                 to_raw: Mapping[str, RawUnits] | None = None
                 ) -> tuple[float, dict[str, ScorecardSilo]]:
    """Silos on the rows of `silo_matrices` holding their tables and points: (base points,
    silos). Each can then give its table, its rows' points and its reasons."""
    silos = silos_for(silo_matrices, model.params.bins, columns, to_raw)
    rows = next(iter(silo_matrices.values())).shape[0]
    predict_margins(model, silos, rows)  # tells each silo its tables
    return send_points(model, silos, cfg), silos


def write_tables(silos: Mapping[str, ScorecardSilo], out: Path) -> list[Path]:
    """Each silo writes its own `scorecard.csv` under out/<silo>/."""
    paths = []
    for name, silo in silos.items():
        silo.write_table(out / name / TABLE_FILE)
        paths.append(out / name / TABLE_FILE)
    return paths


def scores(base: float, silos: Mapping[str, ScorecardSilo]) -> np.ndarray:
    """300..850 scores from the base and the silos' points, rounded and clipped as
    server/scoring.py's `to_score` does with the model's probabilities."""
    total = base + sum(silo.row_points().sum(axis=1) for silo in silos.values())
    return np.clip(np.rint(total), SCORE_MIN, SCORE_MAX).astype(np.int16)


def reasons(silos: Mapping[str, ScorecardSilo], k: int = MAX_REASONS
            ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The bins that cost each person the most points, across silos: each silo ranks its own
    features (points lost against the feature's best bin), the authority merges the silos' top
    k with the same ranking (clients/protocol/reasons.py). Returns (silo names, then per person
    and slot, each (rows, k): the silo's index in the names, its feature index, the points lost
    as a negative number); an empty slot holds -1, -1, NaN."""
    names = list(silos)
    lost, silo_of, feature_of = [], [], []
    for s, party in enumerate(silos.values()):
        idx, pts = party.reasons(k)
        lost.append(np.nan_to_num(pts, nan=0.0))  # an empty slot loses nothing
        silo_of.append(np.full(idx.shape, s))
        feature_of.append(idx)
    which, points = top_reasons_matrix(np.hstack(lost), k)
    rows, at = np.arange(len(which))[:, None], np.maximum(which, 0)
    silo = np.where(which >= 0, np.hstack(silo_of)[rows, at], -1)
    feature = np.where(which >= 0, np.hstack(feature_of)[rows, at], -1)
    return names, silo, feature, points
