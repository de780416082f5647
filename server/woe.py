"""Monotone bins and weight of evidence from per-bin counts (issue 20 item 2).

The one implementation of the scorecard's binning maths, shared by the central reference
(simulations/analysis/references.py, which counts its own quantile pre-bins) and the vertical
scorecard (server/scorecard.py, whose counts come from the silos' protected histograms). Only
counts enter: per pre-bin the number of people `n` and of defaulters `bad`, in the order of the
feature's values; `cuts[i]` is the upper end of bin i (inclusive), the last bin is open above.
What a cut is (a value, or a silo's pre-bin index) is the caller's business.

Weight of evidence per bin: ln(share of non-defaulters / share of defaulters), each share
smoothed by a pseudo-count `smoothing` per bin and class, so a bin without defaults (or without
non-defaulters) stays finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np


def merge(cuts: list[float], n: list[float], bad: list[float], i: int) -> None:
    """Merge bin i with bin i + 1 (in place)."""
    n[i] += n.pop(i + 1)
    bad[i] += bad.pop(i + 1)
    cuts.pop(i)


def rates(n: list[float], bad: list[float], s: float) -> np.ndarray:
    """Smoothed default rate per bin."""
    return (np.asarray(bad) + s) / (np.asarray(n) + 2 * s)


def monotone(cuts: np.ndarray, n: np.ndarray, bad: np.ndarray, s: float, increasing: bool
             ) -> tuple[list[float], list[float], list[float]]:
    """Merge adjacent bins that break the trend until the smoothed default rate is monotone
    (pool adjacent violators)."""
    c, nn, bb = list(cuts), list(n), list(bad)
    while len(nn) > 1:
        step = np.diff(rates(nn, bb, s))
        broken = np.flatnonzero(step < 0 if increasing else step > 0)
        if not len(broken):
            break
        merge(c, nn, bb, int(broken[0]))
    return c, nn, bb


def log_likelihood(n: list[float], bad: list[float], s: float) -> float:
    """Bernoulli log likelihood of the labels under the bins' smoothed rates."""
    r = rates(n, bad, s)
    b, g = np.asarray(bad), np.asarray(n) - np.asarray(bad)
    return float(b @ np.log(r) + g @ np.log1p(-r))


def woe(n: np.ndarray, bad: np.ndarray, s: float) -> np.ndarray:
    """Smoothed weight of evidence per bin; zero for a single bin (it says nothing of risk)."""
    nb, bb = np.asarray(n, dtype=np.float64), np.asarray(bad, dtype=np.float64)
    k = len(nb)
    if k == 1:
        return np.zeros(1)
    good = nb - bb
    return np.log((good + s) / (good.sum() + s * k)) - np.log((bb + s) / (bb.sum() + s * k))


def merge_small(cuts: list[float], n: list[float], bad: list[float], min_count: float) -> None:
    """Merge every bin with fewer than `min_count` people into its smaller neighbour (in
    place), so the bins stay as even as the data allows. An empty bin is merged whatever
    `min_count` says: quantile cuts over tied values can leave one, and its WoE would rest on
    the smoothing alone."""
    while len(n) > 1 and min(n) < max(min_count, 1.0):
        i = int(np.argmin(n))
        j = i - 1 if i == len(n) - 1 or (i > 0 and n[i - 1] <= n[i + 1]) else i
        merge(cuts, n, bad, j)


def monotone_woe(cuts: list[float], n: list[float], bad: list[float], *, min_count: float,
                 smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """(cuts, WoE) of the final bins: small bins merged into a neighbour, then the monotone
    default-rate trend (rising or falling, whichever fits the labels better) by merging
    violators. The inputs are copied, never changed."""
    c, nn, bb = list(cuts), list(n), list(bad)
    if len(nn) != len(c) + 1:
        raise ValueError("need one more bin than cuts")
    merge_small(c, nn, bb, min_count)
    fits = [monotone(np.asarray(c), np.asarray(nn), np.asarray(bb), smoothing, up)
            for up in (True, False)]
    cuts_m, n_m, bad_m = max(fits, key=lambda f: log_likelihood(f[1], f[2], smoothing))
    return np.asarray(cuts_m, dtype=np.float64), woe(np.asarray(n_m), np.asarray(bad_m),
                                                     smoothing)


# ---- the sign-constrained regression over WoE: one projected, backtracking step --------------
T = TypeVar("T")


def projected_step(w: np.ndarray, step: np.ndarray, n_coef: int, loss: float,
                   loss_at: Callable[[np.ndarray], tuple[float, T]]
                   ) -> tuple[np.ndarray, float, T] | None:
    """`w - t * step` with every coefficient (the first `n_coef` entries) projected onto <= 0,
    t halved from 1 until the loss falls: (new w, its loss, what `loss_at` returned beside the
    loss), or None when no step lowers it (converged to the precision of the sums). Shared by
    the central fit (references.py, projected Newton on the WoE columns) and the vertical one
    (server/scorecard.py, where each trial costs a round of the silos' partial logits)."""
    t = 1.0
    while t > 1e-10:
        cand = w - t * step
        cand[:n_coef] = np.minimum(cand[:n_coef], 0.0)
        new_loss, extra = loss_at(cand)
        if new_loss < loss:
            return cand, new_loss, extra
        t /= 2
    return None
