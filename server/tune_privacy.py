"""What tuning on private labels spends: Papernot and Steinke, "Hyperparameter tuning with Renyi
differential privacy" (ICLR 2022; arXiv:2110.03620v2, the numbering used here and by
dp-accounting's `RepeatAndSelectDpEvent`).

The tuner runs a base algorithm Q a random number K of times, each run on a candidate setting
drawn at random independently of the data, and releases only the best run (by a DP score). If
K is data-independent and drawn from

- a truncated negative binomial D_{eta,gamma} (eta >= 0; eta = 0 logarithmic, eta = 1
  geometric), Theorem 2: when Q is (lambda, eps(lambda))-RDP at every order,

      eps'(lambda) = eps(lambda) + (1 + eta) min_lhat [(1 - 1/lhat) eps(lhat) + log(1/gamma)/lhat]
                     + log E[K] / (lambda - 1);

- a Poisson of mean mu (K = 0 releases nothing), Theorem 6: when Q is also
  (epshat, deltahat)-DP with e^epshat <= 1 + 1/(lambda - 1),

      eps'(lambda) = eps(lambda) + mu deltahat + log(mu) / (lambda - 1),

  with epshat = log(1 + 1/(lambda - 1)) and deltahat converted from Q's RDP curve.

Q's curve is the largest over the candidates (Renyi divergence is quasi-convex, so a
data-independent random choice among mechanisms costs at most the costliest). RDP is monotone
in the order, so each eps'(lambda) is then lowered to the least value at any larger order (as
dp-accounting does). The curve is kept at integer orders (Opacus computes the subsampled
Gaussian there exactly and fast; a bound at fewer orders is still a bound) and converted to
(eps, delta) as Opacus's RDP accountant converts (Balle et al. 2020, Theorem 21), the `rdp`
accountant of clients/protocol/accounting.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_delta
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from clients.protocol import accounting  # noqa: F401 (memoises Opacus's RDP for this module)
from clients.protocol.accounting import History

ORDERS: tuple[float, ...] = tuple(float(a) for a in (*range(2, 65), 80, 96, 128, 192, 256))
DISTRIBUTIONS = ("logarithmic", "geometric", "negbin", "poisson")


class TuneBudgetError(ValueError):
    """No per-run budget lets the tuned model meet the asked epsilon."""


# ---- the number of runs ------------------------------------------------------------------------


def tnb_mean(gamma: float, shape: float) -> float:
    """E[K] of the truncated negative binomial D_{shape,gamma} (PS22, Definition 1)."""
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], not {gamma}")
    if gamma == 1:
        return 1.0
    if shape == 0:  # logarithmic
        return (1 / gamma - 1) / math.log(1 / gamma)
    return shape * (1 - gamma) / (gamma * (1 - gamma**shape))


def tnb_gamma(shape: float, mean: float) -> float:
    """The gamma whose D_{shape,gamma} has mean `mean` (the mean falls as gamma grows); the
    returned gamma errs low, so its mean is at least `mean` (a conservative log(1/gamma))."""
    if mean == 1:
        return 1.0
    if shape == 1:
        return 1 / mean
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        if tnb_mean(mid, shape) < mean:
            hi = mid
        else:
            lo = mid
    return lo


@dataclass(frozen=True)
class RunsLaw:
    """How many runs a tune makes: K ~ truncated negative binomial (shape eta: 0 logarithmic,
    1 geometric) or Poisson, of mean `mean`. Drawn from the authority's secret stream only."""

    distribution: str
    mean: float
    shape: float = 1.0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"the runs' distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                             f"not {self.distribution!r}")
        fixed = {"logarithmic": 0.0, "geometric": 1.0}.get(self.distribution)
        if fixed is not None:
            object.__setattr__(self, "shape", fixed)
        if not (math.isfinite(self.shape) and self.shape >= 0):
            raise ValueError(f"the negative binomial's shape must be a number >= 0, not "
                             f"{self.shape}")
        ok = self.mean > 0 if self.poisson else self.mean >= 1  # K >= 1 when truncated
        if not (math.isfinite(self.mean) and ok):
            raise ValueError(f"the mean number of runs must be {'> 0' if self.poisson else '>= 1'}"
                             f", not {self.mean}")

    @property
    def poisson(self) -> bool:
        return self.distribution == "poisson"

    @property
    def gamma(self) -> float:
        return tnb_gamma(self.shape, self.mean)

    def describe(self) -> str:
        if self.poisson:
            return f"Poisson, mean {self.mean:g} (0 runs release nothing)"
        name = {0.0: "logarithmic", 1.0: "geometric"}.get(self.shape,
                                                           f"negative binomial eta={self.shape:g}")
        return f"truncated {name}, mean {self.mean:g}" if name.startswith("neg") \
            else f"{name}, mean {self.mean:g}"

    def draw(self, rng: np.random.Generator) -> int:
        """K, from `rng` (the authority's secret stream: the data never enters it)."""
        if self.poisson:
            return int(rng.poisson(self.mean))
        gamma = self.gamma
        if gamma >= 1:
            return 1
        if self.shape == 0:
            return int(rng.logseries(1 - gamma))
        while True:  # the negative binomial conditioned on K >= 1 (Definition 1)
            k = int(rng.negative_binomial(self.shape, gamma))
            if k >= 1:
                return k


# ---- the RDP curves ------------------------------------------------------------------------------


def rdp_curve(history: History, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of a composition of subsampled Gaussians (sigma, q, steps) at `orders`."""
    out = np.zeros(len(orders))
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if sigma <= 0:
            return np.full(len(orders), np.inf)
        out += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=int(steps),
                                      orders=list(orders)), dtype=float)
    return out


def rdp_epsilon(rdp: np.ndarray, delta: float, orders: Sequence[float] = ORDERS) -> float:
    """(eps, delta) of an RDP curve, as Opacus's RDP accountant converts."""
    if not np.isfinite(rdp).any():
        return math.inf
    eps, _ = get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps)


def repeat_and_select_rdp(rdp: np.ndarray, law: RunsLaw,
                          orders: Sequence[float] = ORDERS) -> np.ndarray:
    """The tuned model's RDP curve from one run's (PS22 Theorem 2, or Theorem 6 for Poisson)."""
    lam = np.asarray(orders, dtype=float)
    rdp = np.asarray(rdp, dtype=float)
    if lam.shape != rdp.shape or (lam <= 1).any():
        raise ValueError("one RDP value per order, every order > 1")
    if law.poisson:
        out = np.empty_like(rdp)
        for i, order in enumerate(lam):
            epshat = math.log1p(1 / (order - 1))
            deltahat, _ = compute_delta(lam, rdp, epshat)
            out[i] = rdp[i] + law.mean * deltahat + math.log(law.mean) / (order - 1)
    else:
        gamma = law.gamma
        with np.errstate(invalid="ignore"):
            inner = (1 - 1 / lam) * rdp + math.log(1 / gamma) / lam
        shift = (1 + law.shape) * float(np.min(inner))
        out = rdp + shift + math.log(tnb_mean(gamma, law.shape)) / (lam - 1)
    # Monotone in the order: a bound at a larger order holds at a smaller one.
    return np.minimum.accumulate(out[::-1])[::-1]


def tuned_epsilon(curves: Iterable[np.ndarray], law: RunsLaw, delta: float) -> float:
    """The tuned, released model's epsilon at `delta`: the largest of the candidates' curves,
    through repeat-and-select, converted."""
    base = np.max(np.vstack(list(curves)), axis=0)
    return rdp_epsilon(repeat_and_select_rdp(base, law), delta)


def per_run_target(total: float, delta: float, law: RunsLaw,
                   curve_of: Callable[[float], np.ndarray], rel_tol: float = 0.01) -> float:
    """The largest per-run epsilon target (within `rel_tol`) whose tuned total stays within
    `total`: `curve_of(eps_run)` is the base curve the runs will have at that target (it may
    raise TuneBudgetError for a target the runs cannot meet at all). Raises TuneBudgetError
    when no target down to total/1000 fits."""
    def cost(eps_run: float) -> float:
        try:
            return tuned_epsilon([curve_of(eps_run)], law, delta)
        except TuneBudgetError:
            return math.inf

    # Too large a target costs too much once tuned; too small a one cannot be met by a run at
    # all (its fixed releases alone pass it, and so for every smaller one): walk down from the
    # total to the first target that fits.
    hi, lo, best = math.inf, total, math.inf
    while True:
        try:
            spent = tuned_epsilon([curve_of(lo)], law, delta)
        except TuneBudgetError as exc:
            tried = (f"the cheapest per-run target tried costs {best:.3g} once tuned, and "
                     if math.isfinite(best) else "")
            raise TuneBudgetError(
                f"no per-run budget meets a total epsilon of {total:g} ({law.describe()}): "
                f"{tried}a run cannot meet a target of {lo:.3g} ({exc}); raise --epsilon or "
                "lower --mean-runs") from None
        best = min(best, spent)
        if spent <= total:
            break
        if lo / 1.5 < total / 1000:
            raise TuneBudgetError(
                f"no per-run budget meets a total epsilon of {total:g} ({law.describe()}): "
                f"the cheapest per-run target tried costs {best:.3g} once tuned; raise "
                "--epsilon, lower --mean-runs, or make the score cheaper (a higher "
                "--score-noise)")
        hi, lo = lo, lo / 1.5
    if math.isinf(hi):
        return lo
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if cost(mid) <= total:
            lo = mid
        else:
            hi = mid
    return lo
