"""Population stability index (PSI): has a cohort moved away from the one the model was built on?

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

over bins i, with e_i and a_i the shares of the expected (reference) and actual (later) cohort in
bin i. Every term is >= 0 (a_i - e_i and ln(a_i / e_i) share their sign), so PSI >= 0 bin by bin,
and PSI is the symmetrised Kullback-Leibler divergence KL(a||e) + KL(e||a) of the binned shares.

Bins come from the expected cohort: `bins` quantile bins (deciles by default), the outer two open
to -inf and +inf so a later value outside the reference range still lands in a bin. Quantile edges
that coincide (heavily tied values, e.g. integer scores or a column that is mostly zero) are
merged, and an edge at the reference's minimum is dropped, so such a column gets fewer bins,
each holding part of the reference, instead of empty ones.

The epsilon floor. A bin that is empty on one side makes ln(a/e) infinite. Each share is floored
at `EPSILON` = 1e-4 (0.01 %) before the formula, without renormalising (the floor changes a share
by at most 1e-4, and every term stays >= 0 without renormalising). With the floor an emptied
decile (e = 0.1, a = 0) contributes 0.1 * ln(0.1 / 1e-4) = 0.69, well above the 0.25 "shift"
threshold, so a vanished bin still reads as a shift, but the number stays finite and comparable.

Thresholds (the industry's rule of thumb, used by the project's issue): below 0.1 "stable",
0.1 up to 0.25 "moderate", 0.25 and more "shift".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

EPSILON = 1e-4
STABLE_BELOW = 0.1
SHIFT_FROM = 0.25
Status = Literal["stable", "moderate", "shift"]


class DriftError(ValueError):
    """Input the PSI cannot be computed on: the message names the problem and the fix."""


def _values(x: npt.ArrayLike, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise DriftError(f"{name}: not numeric; pass a 1-D array of numbers") from None
    if arr.ndim != 1:
        raise DriftError(f"{name}: expected a 1-D array, got shape {arr.shape}; pass one column "
                         "(e.g. the scores, or one silo's points)")
    if arr.size == 0:
        raise DriftError(f"{name} is empty: PSI needs at least one value in each cohort; pass the "
                         "cohort's scores")
    nan = int(np.isnan(arr).sum())
    if nan:
        raise DriftError(f"{name} holds {nan} NaN value(s): PSI is defined on observed values; "
                         "drop them (x[~np.isnan(x)]) or impute them before calling")
    inf = int(np.isinf(arr).sum())
    if inf:
        raise DriftError(f"{name} holds {inf} infinite value(s); clip or drop them before calling")
    return arr


def quantile_edges(expected: npt.ArrayLike, bins: int = 10) -> np.ndarray:
    """The inner bin edges: the 1/bins, ..., (bins-1)/bins quantiles of `expected` (each a value
    of it), ties merged.

    A value v falls in bin `searchsorted(edges, v, side="right")`, i.e. bins are [edge, next edge)
    with the lowest open to -inf and the highest to +inf."""
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 2:
        raise DriftError(f"bins={bins!r}: must be an integer >= 2 (10 gives deciles)")
    e = _values(expected, "expected")
    # Edges are values of `expected` (the next value up, no interpolation): an interpolated edge
    # is rounded, and an increasing affine map of the data (points vs. logits) could round it to
    # the other side of a value sitting on it, changing the PSI with the units.
    inner = np.unique(np.quantile(e, np.arange(1, bins) / bins, method="higher"))
    # An edge at the minimum (ties at the bottom) would leave the lowest bin empty for ever.
    return inner[inner > e.min()]


def bin_counts(values: npt.ArrayLike, edges: npt.ArrayLike, name: str = "values") -> np.ndarray:
    """How many of `values` fall in each of the len(edges) + 1 bins."""
    v = _values(values, name)
    edges = _edges(edges)
    return np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)


def _edges(edges: npt.ArrayLike) -> np.ndarray:
    arr = np.asarray(edges, dtype=np.float64)
    if arr.ndim != 1:
        raise DriftError(f"edges: expected a 1-D array of inner edges, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DriftError("edges hold NaN or infinite values; give finite inner edges (the outer "
                         "bins are open-ended already)")
    if arr.size > 1 and not (np.diff(arr) > 0).all():
        raise DriftError("edges must be strictly increasing; sort them and drop duplicates")
    return arr


def psi_of_counts(expected_counts: npt.ArrayLike, actual_counts: npt.ArrayLike,
                  epsilon: float = EPSILON) -> float:
    """PSI from per-bin counts (or shares) of the two cohorts over the same bins.

    Shares are floored at `epsilon` (see the module's docstring). Symmetric in its two arguments."""
    e = np.asarray(expected_counts, dtype=np.float64)
    a = np.asarray(actual_counts, dtype=np.float64)
    if e.ndim != 1 or a.shape != e.shape:
        raise DriftError(f"counts: need two 1-D arrays of the same length, got shapes {e.shape} "
                         f"and {a.shape}; count both cohorts over the same bins")
    if e.size == 0:
        raise DriftError("counts are empty: give one count per bin")
    for name, c in (("expected_counts", e), ("actual_counts", a)):
        if not np.isfinite(c).all() or (c < 0).any():
            raise DriftError(f"{name}: counts must be finite and >= 0; check the binning")
        if c.sum() <= 0:
            raise DriftError(f"{name} sum to zero: that cohort is empty; PSI needs people in both")
    if not 0 < epsilon < 1:
        raise DriftError(f"epsilon={epsilon!r}: must be in (0, 1); the default is {EPSILON}")
    e_share = np.maximum(e / e.sum(), epsilon)
    a_share = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike, bins: int = 10,
        edges: npt.ArrayLike | None = None, epsilon: float = EPSILON) -> float:
    """PSI of a continuous quantity between a reference cohort and a later one.

    `edges` (inner edges, strictly increasing) fixes the bins, e.g. the reference's edges saved
    at training time or the tier bounds; without it, `bins` quantile bins of `expected`."""
    e = _values(expected, "expected")
    a = _values(actual, "actual")
    inner = quantile_edges(e, bins) if edges is None else _edges(edges)
    value = psi_of_counts(bin_counts(e, inner, "expected"), bin_counts(a, inner, "actual"),
                          epsilon)
    log.debug("psi over %d bins: %.4f", len(inner) + 1, value)
    return value


def classify(value: float) -> Status:
    """"stable" below 0.1, "moderate" from 0.1 up to 0.25, "shift" from 0.25."""
    v = float(value)
    if np.isnan(v) or v < 0:
        raise DriftError(f"psi={value!r}: a PSI is a number >= 0; compute it with psi()")
    if v < STABLE_BELOW:
        return "stable"
    return "moderate" if v < SHIFT_FROM else "shift"


def drift_report(expected: Mapping[str, npt.ArrayLike], actual: Mapping[str, npt.ArrayLike],
                 bins: int = 10) -> dict[str, dict[str, float | str]]:
    """PSI and status for each named quantity present in both cohorts (e.g. "score" and each
    silo's points), in the order of `expected`. A name missing from `actual` is an error, since
    a silently dropped column would read as "no drift"."""
    missing = [k for k in expected if k not in actual]
    if missing:
        raise DriftError(f"actual lacks {', '.join(missing)}; score the later cohort with the "
                         "same silos, or drop those names from expected")
    report: dict[str, dict[str, float | str]] = {}
    for name, ref in expected.items():
        try:
            value = psi(ref, actual[name], bins)
        except DriftError as exc:
            raise DriftError(f"{name}: {exc}") from None
        report[name] = {"psi": value, "status": classify(value)}
    return report
