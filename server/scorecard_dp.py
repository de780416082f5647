"""The differentially private vertical WoE scorecard (issue 20 item 2's DP mode;
`model.kind=scorecard` at a finite privacy.epsilon, wired into a run by
server/scorecard_dp_run.py). In process, like server/gbdt_dp.py: `fit_dp_scorecard` talks to
`SiloEndpoint`s by method calls; the Flower wiring sends the same routing request as one
message per silo over every aligned person.

The protocol follows the DP trees' (server/gbdt_dp.py): the silos are asked ONE
label-independent question and the authority, which holds the labels, computes and noises
everything that is released.

1. Pre-bins. Each silo bins its prepared columns into `bins` equal-width pre-bins over
   +-units of the prepared scale (fixed before any data is read: no quantile edge, as the DP
   trees' uniform bins). The authority asks each silo, with the trees' routing message
   (`RouteRequest`), for its left/right bit at EVERY threshold of every column, for every
   aligned person: a thermometer code whose count of "right" bits is the person's pre-bin.
   Nothing label-dependent reaches a silo, so no randomised response is drawn.
2. Counts. Per (column, pre-bin) of every silo the training people who defaulted and who did
   not, released once with Gaussian noise. One person sits in exactly one pre-bin of each of
   the F columns and is either a defaulter or not, so the release's L2 sensitivity is sqrt(F).
   Noisy counts are held to >= 0; merging (server/woe.py's monotone bins, the minimum bin
   share of the noisy total) and the smoothed WoE are post-processing of them, as are the
   noisy prior (defaulters over people, summed over the first column's bins) and the clipping
   bound C below.
3. Coefficients. `steps` noisy Newton steps on the mean log loss of the intercept and one
   coefficient per column, from beta = 0 and the noisy prior, as server/scoring.py's private
   Platt fit does: per step, the sum of every training person's gradient (p - y) x, clipped to
   L2 norm C (x = (WoE of each column's bin, 1)), and the upper triangle of the Hessian
   sum p (1 - p) x~ x~^T with x~ = x clipped to norm C (Frobenius norm <= C^2 / 4), each with
   Gaussian noise: the gradient at s_G C, the Hessian at s_H C^2 / 4 with s_H = hessian_noise
   s_G, one Gaussian mechanism of whitened multiplier 1 / sqrt(1/s_G^2 + 1/s_H^2)
   (clients/protocol/accounting.py `joint_multiplier`). The noisy Hessian is ridged, made
   positive definite and the step held to a trust region; every coefficient is projected onto
   <= 0 (post-processing). C is `clip` times the root mean square of ||x|| estimated from the
   noisy counts. The steps are fixed in number: no stopping rule, no validation selection.

Privacy (add/remove one person). Everything is Gaussian without subsampling (each release
reads every training person), so the counts and the steps compose exactly into one Gaussian
mechanism: `plan_noise` calibrates that mechanism's multiplier with the project's accountant
after the caller's `prefix` (the silos' preparation statistics) and splits it, a share
`count_share` of 1/sigma^2 to the counts and the rest evenly over the steps. `DpScorecardRelease`
records the mechanism; its `ledger_lines()` are `GaussianRelease` lines the ledger verifies.

What each party learns. The released model (the WoE tables over public pre-bin indices, the
coefficients, the intercept, the points) is (epsilon, delta)-DP against whoever receives it.
The AUTHORITY is not protected against (it holds the labels): it learns every aligned
person's pre-bin of every silo column (on the prepared scale; never a raw value, a declared
range or a transform). That is what the non-private scorecard's partial logits disclose after
as many coefficient vectors as a silo has columns (the merged bins), one step finer, and what
the DP trees' routing bits approach. The SILOS receive the training positions, their
(column, threshold) questions (all of them, so nothing chosen), and at the end the DP model's
tables and coefficients for their own columns: nothing else label-dependent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from clients.protocol.accounting import History, add_steps, calibrate_sigma, joint_multiplier
from clients.protocol.accounting import epsilon as accounted_epsilon
from clients.protocol.gbdt import RouteReply, RouteRequest, SiloEndpoint
from clients.protocol.scorecard import FeatureWoe
from crypto.secret_random import SecretRandom
from server.gbdt import sigmoid
from server.ledger_lines import GaussianRelease
from server.scorecard import ScorecardParams, VerticalScorecard, feature_woe

log = logging.getLogger(__name__)

AUTHORITY = "authority"
PURPOSE = "dp-scorecard"
COUNTS_PURPOSE = "dp-scorecard counts"
STEPS_PURPOSE = "dp-scorecard newton steps"
RIDGE = 0.01  # share of the noisy number of people added to the Hessian's diagonal
TRUST = 2.0  # the longest Newton step (L2, in coefficients and intercept)


@dataclass(frozen=True, kw_only=True)
class DpScorecardParams:
    """The DP scorecard's settings; `card` holds the binning's (pre-bins, minimum bin share,
    smoothing), the non-private scorecard's."""

    card: ScorecardParams = field(default_factory=ScorecardParams)
    steps: int = 6  # noisy Newton steps, fixed
    count_share: float = 0.4  # of the budget (in 1/sigma^2) given to the counts
    hessian_noise: float = 2.0  # s_H / s_G: H is large next to its sensitivity
    clip: float = 1.0  # C over the root mean square of ||x|| (noisy counts' estimate)
    accountant: str = "prv"

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 100 or not 0 < self.count_share < 1:
            raise ValueError("steps must lie in [1, 100] and count_share in (0, 1)")
        if self.hessian_noise <= 0 or self.clip <= 0:
            raise ValueError("hessian_noise and clip must be > 0")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError("accountant must be 'prv' or 'rdp'")


@dataclass(frozen=True, kw_only=True)
class DpScorecardRelease:
    """The mechanism of one training, as the ledger needs it: after `prefix`, the counts (one
    Gaussian release at `count_noise_multiplier`, sensitivity sqrt F) then `steps` Newton
    steps (each one Gaussian release of whitened multiplier `noise_multiplier`: the gradient
    at `gradient_noise_multiplier` times C, the Hessian at `hessian_noise_multiplier` times
    C^2 / 4). `epsilon` is the accountant's for the whole history at `delta`; inf without
    noise."""

    accountant: str
    target_epsilon: float
    epsilon: float
    delta: float
    count_noise_multiplier: float
    noise_multiplier: float
    gradient_noise_multiplier: float
    hessian_noise_multiplier: float
    steps: int
    sample_rate: float = 1.0  # every release reads every training person
    prefix: tuple[tuple[float, float, int], ...] = ()

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def history(self) -> History:
        """The accountant's history: prefix, counts, steps."""
        return add_steps(self._counts(), self.noise_multiplier, 1.0, self.steps)

    def _counts(self) -> History:
        return add_steps(list(self.prefix), self.count_noise_multiplier, 1.0, 1)

    def ledger_lines(self, round_: int = 0) -> list[GaussianRelease]:
        """The counts' and the steps' lines (the prefix's are its releaser's), each with the
        epsilon of everything up to it."""
        if not self.private:
            return []
        counts = accounted_epsilon(self.accountant, self._counts(), self.delta)
        return [
            GaussianRelease(party=AUTHORITY, population="train", purpose=COUNTS_PURPOSE,
                            noise_multiplier=self.count_noise_multiplier, sample_rate=1.0,
                            steps=1, round=round_, delta=self.delta,
                            accountant=self.accountant, epsilon=counts),
            GaussianRelease(party=AUTHORITY, population="train", purpose=STEPS_PURPOSE,
                            noise_multiplier=self.noise_multiplier, sample_rate=1.0,
                            steps=self.steps, round=round_, delta=self.delta,
                            accountant=self.accountant, epsilon=self.epsilon),
        ]


def plan_noise(params: DpScorecardParams, *, epsilon_: float, delta: float,
               prefix: History | Sequence[tuple[float, float, int]] = ()
               ) -> DpScorecardRelease:
    """Calibrate the noise so that prefix + counts + steps meet (epsilon_, delta) with the
    project's accountant (within `calibrate_sigma`'s 0.5 %). Gaussian releases without
    subsampling compose into one Gaussian of multiplier (sum 1/sigma_i^2)^(-1/2), so ONE
    multiplier is calibrated and split by `count_share`. epsilon_ = inf: no noise."""
    prefix_t = tuple((float(s), float(q), int(n)) for s, q, n in prefix)
    if not math.isfinite(epsilon_):
        return DpScorecardRelease(
            accountant=params.accountant, target_epsilon=math.inf, epsilon=math.inf,
            delta=delta, count_noise_multiplier=0.0, noise_multiplier=0.0,
            gradient_noise_multiplier=0.0, hessian_noise_multiplier=0.0, steps=params.steps,
            prefix=prefix_t)
    if not 0 < delta < 1 or epsilon_ <= 0:
        raise ValueError("epsilon must be > 0 and delta in (0, 1)")
    whole = calibrate_sigma(epsilon_, delta, 1.0, 1, params.accountant, prefix=list(prefix_t))
    return split_noise(params, whole, target=epsilon_, delta=delta, prefix=prefix_t)


def split_noise(params: DpScorecardParams, whole: float, *, target: float, delta: float,
                prefix: History | Sequence[tuple[float, float, int]] = ()
                ) -> DpScorecardRelease:
    """The scorecard's mechanism at ONE given Gaussian multiplier `whole` for counts and steps
    together (split by `count_share`), its epsilon accounted after `prefix`. plan_noise
    calibrates `whole` to the whole budget; a stage of a larger model (the DP trees' first
    additive stage, server/gbdt_dp_init.py) gives it a share of one."""
    prefix_t = tuple((float(s), float(q), int(n)) for s, q, n in prefix)
    if not whole > 0:
        raise ValueError("the scorecard's noise multiplier must be > 0")
    epsilon_ = target
    counts = whole / math.sqrt(params.count_share)
    step = whole * math.sqrt(params.steps / (1.0 - params.count_share))
    k = params.hessian_noise
    s_g = step * math.sqrt(1.0 + 1.0 / k**2)  # 1/s_G^2 + 1/(k s_G)^2 = 1/step^2
    release = DpScorecardRelease(
        accountant=params.accountant, target_epsilon=epsilon_, epsilon=0.0, delta=delta,
        count_noise_multiplier=counts, noise_multiplier=step, gradient_noise_multiplier=s_g,
        hessian_noise_multiplier=k * s_g, steps=params.steps, prefix=prefix_t)
    assert math.isclose(joint_multiplier([counts] + [step] * params.steps), whole)
    spent = accounted_epsilon(params.accountant, release.history(), delta)
    log.info("dp scorecard: counts multiplier %.3f, %d steps at %.3f (G %.3f, H %.3f), "
             "epsilon %.4f at delta %.3g", counts, params.steps, step, s_g, k * s_g, spent,
             delta)
    return replace(release, epsilon=spent)


# ---- step 1: every person's pre-bins from the silos' routing bits -----------------------------


def thresholds_request(features: int, bins: int) -> RouteRequest:
    """A silo's question: its bit at every threshold of every column (column-major)."""
    return RouteRequest(splits=tuple((f, b) for f in range(features) for b in range(bins - 1)))


def pre_bins(reply: RouteReply, features: int, bins: int) -> np.ndarray:
    """(rows, features) pre-bin of every row: the number of thresholds it lies right of
    (`GbdtSilo.route`: left means pre-bin <= threshold)."""
    if reply.left.shape[0] != features * (bins - 1):
        raise ValueError(f"silo {reply.silo} returned routing bits of the wrong shape")
    right = ~reply.left.reshape(features, bins - 1, -1)
    return right.sum(axis=1, dtype=np.int64).T


def route_pre_bins(silos: Mapping[str, SiloEndpoint], bins: int) -> dict[str, np.ndarray]:
    """In process: every silo's pre-bins of its rows, one routing request each."""
    return {name: pre_bins(silo.route(thresholds_request(silo.features, bins)),
                           silo.features, bins)
            for name, silo in silos.items()}


# ---- steps 2 and 3: the authority's noisy statistics -----------------------------------------


@dataclass(frozen=True, kw_only=True)
class DpScorecard:
    """A trained scorecard (its steps are the Newton steps) and its mechanism."""

    model: VerticalScorecard
    release: DpScorecardRelease
    clip: float  # C, from the noisy counts


def noisy_counts(bins: Mapping[str, np.ndarray], y: np.ndarray, n_bins: int,
                 release: DpScorecardRelease, rng: np.random.Generator
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per silo (defaulters, people), each (features, n_bins), noised once (every cell, empty
    ones too: which are empty is data) and held to >= 0."""
    columns = sum(b.shape[1] for b in bins.values())
    std = release.count_noise_multiplier * math.sqrt(columns)
    out = {}
    for name, b in bins.items():
        f = b.shape[1]
        cells = (b + n_bins * np.arange(f)).ravel()
        rep_y = np.repeat(y, f)
        bad = np.bincount(cells, weights=rep_y, minlength=f * n_bins).reshape(f, n_bins)
        good = np.bincount(cells, weights=1 - rep_y, minlength=f * n_bins).reshape(f, n_bins)
        if release.private:
            bad = np.maximum(bad + rng.normal(0.0, std, bad.shape), 0.0)
            good = np.maximum(good + rng.normal(0.0, std, good.shape), 0.0)
        out[name] = (bad, bad + good)
    return out


def design(bins: Mapping[str, np.ndarray], tables: Mapping[str, tuple[FeatureWoe, ...]]
           ) -> np.ndarray:
    """(rows, F + 1) WoE of each row's bin of every column, silo by silo, then 1."""
    cols = []
    for name, b in bins.items():
        for f, t in enumerate(tables[name]):
            cols.append(np.asarray(t.woe)[np.searchsorted(t.cuts, b[:, f], side="left")])
    return np.column_stack([*cols, np.ones(len(next(iter(bins.values()))))])


def clip_bound(counts: Mapping[str, tuple[np.ndarray, np.ndarray]],
               tables: Mapping[str, tuple[FeatureWoe, ...]], clip: float) -> float:
    """`clip` times sqrt(1 + sum over columns of the mean squared WoE) under the noisy
    counts' shares: the root mean square of ||x|| if columns were independent."""
    total = 1.0
    for name, (_, n) in counts.items():
        for f, t in enumerate(tables[name]):
            merged = np.searchsorted(t.cuts, np.arange(n.shape[1]), side="left")
            share = np.bincount(merged, weights=n[f], minlength=len(t.woe)) / max(n[f].sum(), 1)
            total += float(share @ np.asarray(t.woe) ** 2)
    return clip * math.sqrt(total)


def _clipped(v: np.ndarray, bound: float) -> np.ndarray:
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v * np.minimum(1.0, bound / np.maximum(norm, 1e-300))


def newton_steps(x: np.ndarray, y: np.ndarray, w0: np.ndarray, people: float, bound: float,
                 release: DpScorecardRelease, rng: np.random.Generator) -> np.ndarray:
    """`release.steps` noisy Newton steps from w0 on the mean log loss of x @ w (the last
    column is the intercept's 1); `people` is the noisy number of training people (the
    ridge's scale). Every coefficient but the intercept stays <= 0."""
    d = x.shape[1]
    upper = np.triu_indices(d)
    x_h = _clipped(x, bound)
    ridge = RIDGE * max(people, 1.0)
    w = w0.copy()
    for _ in range(release.steps):
        p = sigmoid(x @ w)
        grad = _clipped((p - y)[:, None] * x, bound).sum(axis=0)
        hess = (x_h * (p * (1 - p))[:, None]).T @ x_h
        if release.private:
            grad = grad + rng.normal(0.0, release.gradient_noise_multiplier * bound, d)
            noise = np.zeros((d, d))
            noise[upper] = rng.normal(0.0, release.hessian_noise_multiplier * bound**2 / 4,
                                      len(upper[0]))
            hess = hess + np.triu(noise) + np.triu(noise, 1).T
        values, vectors = np.linalg.eigh(hess + ridge * np.eye(d))
        step = vectors @ ((vectors.T @ grad) / np.maximum(values, ridge))
        w = w - step * min(1.0, TRUST / max(float(np.linalg.norm(step)), 1e-12))
        w[:-1] = np.minimum(w[:-1], 0.0)
    return w


def fit_from_bins(bins: Mapping[str, np.ndarray], y: np.ndarray, params: DpScorecardParams,
                  release: DpScorecardRelease, rng: SecretRandom, *, purpose: str = ""
                  ) -> DpScorecard:
    """The authority's part after routing: `bins` per silo (rows, features) pre-bins of the
    training rows, y their 0/1 labels. The counts' and the steps' noise each from their own
    stream of `rng` (the authority's secret), addressed by `purpose` (e.g. the run key)."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y must be a 1-d array of 0/1 labels")
    if not bins or any(b.shape[0] != len(y) for b in bins.values()):
        raise ValueError("bins need one row per label, for at least one silo")
    if release.steps != params.steps:
        raise ValueError("the release was planned for another number of steps")
    card = params.card
    counts = noisy_counts(bins, y, card.bins, release,
                          rng.generator(PURPOSE, purpose, "counts"))
    tables = {name: tuple(feature_woe(n[f], bad[f], card) for f in range(n.shape[0]))
              for name, (bad, n) in counts.items()}
    bad0, n0 = next(iter(counts.values()))
    people = float(n0[0].sum())
    rate = float(np.clip(bad0[0].sum() / max(people, 1.0), 0.001, 0.999))
    bound = clip_bound(counts, tables, params.clip)
    x = design(bins, tables)
    w0 = np.zeros(x.shape[1])
    w0[-1] = math.log(rate / (1 - rate))
    w = newton_steps(x, y, w0, people, bound, release,
                     rng.generator(PURPOSE, purpose, "steps"))
    sizes = np.cumsum([0, *(b.shape[1] for b in bins.values())])
    coef = {name: w[sizes[i]:sizes[i + 1]] for i, name in enumerate(bins)}
    model = VerticalScorecard(params=card, tables=tables, coef=coef, intercept=float(w[-1]),
                              steps=params.steps)
    log.info("dp scorecard: %d bins over %d columns, clip %.3f, %d steps",
             sum(len(t.woe) for ts in tables.values() for t in ts), x.shape[1] - 1, bound,
             params.steps)
    return DpScorecard(model=model, release=release, clip=bound)


def fit_dp_scorecard(silos: Mapping[str, SiloEndpoint], y: np.ndarray,
                     params: DpScorecardParams, *, epsilon: float, delta: float,
                     rng: SecretRandom, purpose: str = "",
                     prefix: History | Sequence[tuple[float, float, int]] = ()) -> DpScorecard:
    """In process: train on the silos' aligned rows 0..M-1 (y: the authority's 0/1 labels of
    those rows) within (epsilon, delta) for everything released, after `prefix`."""
    release = plan_noise(params, epsilon_=epsilon, delta=delta, prefix=prefix)
    return fit_from_bins(route_pre_bins(silos, params.card.bins), y, params, release, rng,
                         purpose=purpose)


def margins(model: VerticalScorecard, bins: Mapping[str, np.ndarray]) -> np.ndarray:
    """Everyone's logit from their pre-bins (what the silos' partial logits sum to)."""
    return design(bins, model.tables)[:, :-1] @ np.concatenate(
        [model.coef[name] for name in bins]) + model.intercept
