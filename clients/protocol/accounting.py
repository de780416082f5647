"""Privacy accounting with Opacus's accountants, and calibration of the noise to a budget.

Shared by every party (the authority imports it from here; a silo deploys without server/).

Every party keeps ONE accountant for the whole run (its history is the run-length encoded list
of (noise multiplier, sample rate, steps)); it is persisted with the party's state and never
rebuilt per round, which is how Flower's Opacus example under-reports.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import cast

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier

from clients.protocol.dp_constants import STATISTICS_NOISE_MULTIPLIER  # noqa: F401 (re-exported)

History = list[tuple[float, float, int]]

# Opacus's RDP of one subsampled Gaussian step at one order is a pure function of
# (q, sigma, order), summed over a Python series: about 10 ms for each fractional order, 1.5 s
# for its grid of 151 orders. Every RDP epsilon asks it again for each (q, sigma) of a
# history, and so does every PRV epsilon (twice, to size its domain), although a run composes
# the same one or two (q, sigma) round after round. Memoised here, once per process: the same
# numbers, computed once (a region's per-round budget check went from 2.1 s to milliseconds).
if not hasattr(opacus_rdp._compute_rdp, "cache_info"):
    opacus_rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(opacus_rdp._compute_rdp)

# Opacus warns about optimal RDP orders at the edge of its grid; the numbers stay valid upper
# bounds. Filtered once here: catch_warnings() is not thread-safe and the ledger runs on a thread.
warnings.filterwarnings("ignore", module=r"opacus\.accountants")


def make_accountant(kind: str, history: History | None = None) -> IAccountant:
    acc: IAccountant = {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()
    acc.history = [tuple(h) for h in (history or [])]
    return acc


# Opacus's PRV accountant bounds epsilon within an ABSOLUTE error (0.01 by default): 6 % at
# epsilon 0.17. We ask for 0.5 % of a first estimate (at least 5e-4) instead; either way it
# returns the upper end of its bound, so a reported epsilon never under-states the spend.
PRV_RELATIVE_ERROR = 0.005
PRV_MIN_ERROR = 5e-4


def epsilon(kind: str, history: History, delta: float, precise: bool = True) -> float:
    """Cumulative epsilon of a history (an upper bound); 0 for no steps.

    `precise=False` keeps Opacus's default PRV error (0.01, about 10x faster): still an upper
    bound, used for intermediate ledger lines."""
    if not history or sum(h[2] for h in history) == 0:
        return 0.0
    return _epsilon(kind, tuple((float(s), float(q), int(n)) for s, q, n in history), delta,
                    precise)


# A pure function of its arguments, asked the same question often: the plan's mirror of each
# silo, the ledger's lines and the final summary compose the same histories, and one PRV
# composition costs about a second of CPU.
@functools.lru_cache(maxsize=512)
def _epsilon(kind: str, history: tuple[tuple[float, float, int], ...], delta: float,
             precise: bool) -> float:
    if kind != "prv" or not precise:
        return float(make_accountant(kind, list(history)).get_epsilon(delta))
    rough = _epsilon(kind, history, delta, False)
    error = max(PRV_MIN_ERROR, PRV_RELATIVE_ERROR * rough)
    if error >= 0.01:
        return rough
    return float(make_accountant(kind, list(history)).get_epsilon(delta, eps_error=error))


def _copied(history: Iterable[Sequence[float]]) -> History:
    # Entries may arrive as lists (from JSON); tuple() copies each as (sigma, q, steps).
    return cast(History, [tuple(h) for h in history])


def joint_multiplier(sigmas: Iterable[float]) -> float:
    """The noise multiplier of blocks stacked into one Gaussian mechanism (each block clipped
    at its own bound, noised at sigma_k times it): 1 / sqrt(sum_k 1 / sigma_k^2)."""
    return 1.0 / math.sqrt(sum(1.0 / s**2 for s in sigmas))


def add_steps(history: History, sigma: float, q: float, steps: int) -> History:
    """History after `steps` more steps, run-length encoded as Opacus does."""
    out = _copied(history)
    if steps <= 0:
        return out
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, out[-1][2] + steps)
    else:
        out.append((sigma, q, steps))
    return out


def calibrate_sigma(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str,
    prefix: History | tuple[()] = (),
) -> float:
    """The smallest noise multiplier (within 0.5 % of the target epsilon) that keeps `steps`
    steps at `sample_rate`, after the mechanisms already in `prefix`, within
    (target_epsilon, delta)."""
    if not math.isfinite(target_epsilon):
        return 0.0
    if not prefix:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=kind, epsilon_tolerance=0.005,
        ))
    prefix = _copied(prefix)
    if epsilon(kind, prefix, delta) >= target_epsilon:
        raise ValueError(f"the mechanisms before training already spend epsilon "
                         f"{epsilon(kind, prefix, delta):.3g} >= {target_epsilon:g}")

    def eps(sigma: float) -> float:
        return epsilon(kind, add_steps(prefix, sigma, sample_rate, steps), delta, precise=False)

    lo, hi = 0.1, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
    while hi - lo > 0.001 * hi:  # bisection on the noise; eps falls as sigma grows
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def affordable_steps(
    kind: str, history: History, sigma: float, q: float, wanted: int, delta: float, cap: float
) -> int:
    """How many of `wanted` further steps keep the cumulative epsilon within `cap`."""
    # Opacus's coarser PRV bound is an upper bound too: when it fits, the precise one (about
    # twice the cost) is not needed to know that all the steps fit.
    if epsilon(kind, add_steps(history, sigma, q, wanted), delta, precise=False) <= cap:
        return wanted
    if epsilon(kind, add_steps(history, sigma, q, wanted), delta) <= cap:
        return wanted
    lo, hi = 0, wanted  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon(kind, add_steps(history, sigma, q, mid), delta) <= cap:
            lo = mid
        else:
            hi = mid
    return lo
