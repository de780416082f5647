"""Reason codes inside a silo: which of its features move a person's contribution most.

The silo attributes g_k(x) - g_k(ref) to its own features (clients/protocol/reasons.py, "path"
method, exact in sum) against its average person `ref`: the all-zero input, i.e. every numeric
column at the silo's DP-estimated mean, present, and in no category group. (A median of the inputs
would be a private statistic shaping every released reason, outside the accountant.)
and releases per person only: the total, and the k features that raise the default logit most
with their shares. The authority turns logit units into score points (-PDO / ln 2 * Platt
slope), so nothing here needs the calibration, and no feature value leaves the silo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clients.protocol.reasons import feature_attributions, feature_groups, top_reasons_matrix
from clients.silo.data import SiloMatrix

if TYPE_CHECKING:
    from clients.silo.trainer import SiloTrainer

NO_REASON = -1


@dataclass(frozen=True)
class SiloExplanation:
    """For n people: delta (n,) = g(x) - g(ref); index (n, k) of the features raising the logit
    most (NO_REASON pads); share (n, k) of each (0 in the padding); reference = g(ref)."""

    delta: np.ndarray
    index: np.ndarray
    share: np.ndarray
    reference: float
    features: list[str]


def features_of(matrix: SiloMatrix) -> list[str]:
    """The silo's features in schema order, from its matrix's column names."""
    names: list[str] = []
    for col in matrix.columns:
        base = col.split("__", 1)[0].split("=", 1)[0]
        if base not in names:
            names.append(base)
    return names


def explain(trainer: SiloTrainer, matrix: SiloMatrix, x: np.ndarray, k: int,
            features: list[str] | None = None) -> SiloExplanation:
    """Attribute the contributions of the rows `x` (prepared inputs) to the silo's features."""
    features = features or features_of(matrix)
    groups = feature_groups(matrix.columns, features)
    ref = np.zeros(matrix.x.shape[1], dtype=np.float32)  # the DP-standardised average person

    def f(rows: np.ndarray) -> np.ndarray:
        return trainer.contributions(np.ascontiguousarray(rows, dtype=np.float32))

    reference = float(f(ref[None, :])[0])
    delta = f(x).astype(np.float64) - reference
    shares = feature_attributions(f, x, ref, groups)
    # Largest logit increases first: top_reasons_matrix picks the most negative values.
    index, value = top_reasons_matrix(-shares, k)
    share = np.where(index >= 0, -np.nan_to_num(value), 0.0)
    return SiloExplanation(delta.astype(np.float32), index.astype(np.int16),
                           share.astype(np.float32), reference, features)
