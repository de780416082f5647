"""One-run canary audit of what a DP tree run releases (Steinke, Nasr, Jagielski 2023).

simulations/analysis/canary_audit.py audits the joint DP-SGD. A DP tree run (model.kind=gbdt
at a finite epsilon; server/gbdt_dp.py) releases other things, and this module audits those
with the same game, the same Corollary 5.4 bound and the same Bonferroni guesses (it imports
them from canary_audit.py):

* leaf sums: per tree, a Poisson sample at rate q, every leaf's (G, H) with Gaussian noise of
  std s_G on G and s_H / 4 on H (`gbdt_dp.noisy_sums`);
* split histograms (`gbdt.guide_every` > 0, guide_stat "bins"): per stage, every (column, bin)'s
  (G, H) over everyone, std s_G sqrt(d) and s_H sqrt(d) / 4 (`gbdt_dp_guide.noisy_histograms`);
* the first additive stage's counts (`gbdt.init=additive`) or the DP scorecard's
  (model.kind=scorecard): per (column, pre-bin) the defaulters and the others, std
  c sqrt(F), held to >= 0 (`scorecard_dp.noisy_counts`).

Each release is replayed by the function that noises it in a run, driven by the auditor's
streams: a fresh secret from the auditor's OS-entropy generator keys the noise (and the
Poisson samples), as canary_audit.py does for its parties.

Canaries in cells of their own. The auditor flips a secret fair coin per canary (m of them).
An included canary is a row with the largest gradient and hessian any row can have: g = 1
(g = p - y lies in [-1, 1]) and h = 1/4 (h = p (1 - p)); the audit's constants, not
server/gbdt_dp.py's G_BOUND and H_BOUND, so a wrong bound there is caught. Each canary sits in
a cell no other row reaches: in every tree its own leaf (the canaries fill auditor trees of
the run's depth, 2^depth canaries each, noised by `noisy_sums` like the run's tree), in every
split histogram its own bin of every column, in the counts its own pre-bin of every column
(a defaulter there). Real rows are left out: they would add the same thing with or without a
canary to cells the auditor does not read. Adding cells with independent noise and one row
each keeps every person's sensitivity per release (one leaf, one bin per column), so the
replayed mechanism is the one the accountant claims (eps, delta) for, per canary: parallel
composition over the canaries' cells, the releases composed as in the run. The canaries'
(g, h) stay at the maximum in every release (worst case for the adaptive composition, which
the accountant covers); the trees' prior, the stage's Newton steps, the silos' statistics
and the calibration are not replayed (`not_audited`): leaving releases out can only lower the
bound, so a bound above the accounted epsilon still proves a bug.

Scores. Each release's cells of a canary are projected on its contribution, whitened by the
claimed noise: u = <y, mu>_Sigma / |mu|^2_Sigma, N(0, sigma^2) if out, N(1, sigma^2) if in
(with probability q for the leaves), sigma the release's whitened (joint) multiplier. The
"likelihood" statistic (default) sums over releases each one's log likelihood ratio, in
against out (canary_audit.py `log_likelihood_ratios`; for the counts, clamped at 0, the
censored Gaussian's); "sum" sums the projections. Without noise both are the sum.

Measured (bench/RESULTS.md "The canary audit of the DP trees' own releases", 5,000 canaries,
three seeds, UCI- and population-sized): without noise 5.85-6.07; at accounted epsilon 8
2.4-3.4, at epsilon 1 0.13-0.55, whatever the mechanism (random, guided, additive), in 0.4-1.6
s. G noised at H's bound (a quarter of the leaves' noise) at epsilon 1 certifies 1.28-1.51:
caught. The one-run audit cannot catch everything: half the noise on G and H at epsilon 1
certifies 0.70-0.92, below the claim.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import log_ndtr

from clients.protocol.accounting import History, add_steps, joint_multiplier
from clients.protocol.accounting import epsilon as accounted_epsilon
from crypto.secret_random import SECRET_BYTES, SecretRandom
from server import gbdt_dp, gbdt_dp_guide, gbdt_dp_init, scorecard_dp
from server.ledger_lines import GaussianRelease, LedgerLine
from simulations.analysis.canary_audit import (
    DEFAULT_BETA,
    STATISTICS,
    best_bound,
    bound_summary,
    default_guesses,
    log_likelihood_ratios,
)

logger = logging.getLogger(__name__)

METHOD = ("one-run canary audit of the DP trees' releases, white-box canaries of maximal "
          "(g, h) in cells of their own (Steinke, Nasr, Jagielski 2023)")
# The largest |g| and h of any row: g = p - y in [-1, 1], h = p (1 - p) <= 1/4.
CANARY_G = 1.0
CANARY_H = 0.25
COUNT_PURPOSES = (gbdt_dp_init.COUNTS_PURPOSE, scorecard_dp.COUNTS_PURPOSE)
# Canaries of a run's audit. Cheap here (0.4 s at the default trees), and 1,000 are too few to
# catch a quarter of the leaves' noise at eps 1 (bench/RESULTS.md "The canary audit of the DP
# trees' own releases": 0.70-1.04 against 1.28-1.51 with 5,000).
CANARIES = 5000


@dataclass(frozen=True, kw_only=True)
class TreeMechanism:
    """The releases the audit replays: `trees` leaf-sum releases (whitened multiplier
    `noise_multiplier`, Poisson rate `sample_rate`, trees of `depth`), `guides` split-histogram
    releases (multiplier `guide_noise_multiplier`), both with H noised `hessian_noise` times
    harder than G, and `counts` count releases (multiplier `count_noise_multiplier`) over
    `columns` silo columns. `not_audited`: what the run also released."""

    depth: int = 6
    trees: int = 0
    sample_rate: float = 1.0
    noise_multiplier: float = 0.0
    hessian_noise: float = 4.0
    guides: int = 0
    guide_noise_multiplier: float = 0.0
    counts: int = 0
    count_noise_multiplier: float = 0.0
    columns: int = 1
    accountant: str = "prv"
    not_audited: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.trees < 0 or self.guides < 0 or self.counts not in (0, 1):
            raise ValueError("trees and guides must be >= 0, counts 0 or 1")
        if not self.trees + self.guides + self.counts:
            raise ValueError("nothing to audit: no leaf sums, histograms or counts")
        if self.columns < 1 or not 0 < self.sample_rate <= 1:
            raise ValueError("columns must be >= 1 and sample_rate in (0, 1]")
        sigmas = (self.noise_multiplier, self.guide_noise_multiplier,
                  self.count_noise_multiplier)
        if not all(s >= 0 and math.isfinite(s) for s in sigmas):
            raise ValueError("noise multipliers must be finite and >= 0")

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0 or self.guide_noise_multiplier > 0 or (
            self.count_noise_multiplier > 0)

    def history(self) -> History:
        """The accountant's history of the audited releases alone (counts, histograms, leaf
        sums, in the run's order)."""
        history = add_steps([], self.count_noise_multiplier, 1.0, self.counts)
        history = add_steps(history, self.guide_noise_multiplier, 1.0, self.guides)
        return add_steps(history, self.noise_multiplier, self.sample_rate, self.trees)

    def describe(self) -> str:
        parts = []
        if self.counts:
            parts.append(f"{self.counts} noisy-count release over {self.columns} columns "
                         f"(multiplier {self.count_noise_multiplier:.4g})")
        if self.guides:
            parts.append(f"{self.guides} split-histogram releases (multiplier "
                         f"{self.guide_noise_multiplier:.4g})")
        if self.trees:
            parts.append(f"{self.trees} leaf-sum (G, H) releases at q {self.sample_rate:.4g} "
                         f"(multiplier {self.noise_multiplier:.4g}, depth {self.depth})")
        return "; ".join(parts)


def split_gh(joint: float, hessian_noise: float) -> tuple[float, float]:
    """(s_G, s_H) whose stacked multiplier is `joint`, s_H = hessian_noise s_G: the split
    server/gbdt_dp.py `plan_noise` makes (checked against `joint_multiplier`)."""
    if joint == 0:
        return 0.0, 0.0
    s_g = joint * math.sqrt(1.0 + 1.0 / hessian_noise**2)
    if not math.isclose(joint_multiplier([s_g, hessian_noise * s_g]), joint):
        raise AssertionError("the (G, H) split does not stack to the joint multiplier")
    return s_g, hessian_noise * s_g


def from_release(params: gbdt_dp.DpTreeParams,
                 release: gbdt_dp.DpTreesRelease | gbdt_dp_init.InitTreesRelease,
                 columns: int) -> TreeMechanism:
    """The mechanism of a planned training (`gbdt_dp.plan_noise`, `gbdt_dp_init.plan_noise`)."""
    trees = release.trees if isinstance(release, gbdt_dp_init.InitTreesRelease) else release
    stage = release.stage if isinstance(release, gbdt_dp_init.InitTreesRelease) else None
    guides = trees.guides if params.guide_stat == "bins" else 0
    skipped = [*(["the trees' noisy prior"] if trees.priors else []),
               *([f"split releases of guide_stat {params.guide_stat!r}"]
                 if trees.guides and not guides else []),
               *(["the first stage's Newton steps"] if stage is not None else [])]
    return TreeMechanism(
        depth=params.depth, trees=trees.trees, sample_rate=trees.sample_rate,
        noise_multiplier=trees.noise_multiplier, hessian_noise=params.hessian_noise,
        guides=guides, guide_noise_multiplier=trees.guide_noise_multiplier if guides else 0.0,
        counts=1 if stage is not None else 0,
        count_noise_multiplier=stage.count_noise_multiplier if stage is not None else 0.0,
        columns=columns, accountant=params.accountant,
        not_audited=(*skipped, "the silos' preparation statistics", "the DP calibration"))


def from_ledger(lines: Sequence[LedgerLine], *, depth: int, hessian_noise: float,
                guide_stat: str, columns: int, accountant: str) -> TreeMechanism | None:
    """The mechanism a DP tree (or DP scorecard) run's ledger records: its leaf-sum,
    split-histogram and count lines, with the run's depth, H/G noise ratio and guide
    statistic (authority.json's `gbdt`). None when the ledger has none of them."""
    found = {line.purpose: line for line in lines
             if isinstance(line, GaussianRelease) and line.party == gbdt_dp.AUTHORITY}
    leaves = found.get(gbdt_dp.TREES_PURPOSE)
    guide = found.get(gbdt_dp.GUIDE_PURPOSE)
    counts = next((found[p] for p in COUNT_PURPOSES if p in found), None)
    if leaves is None and counts is None:
        return None
    audited_guides = guide if guide is not None and guide_stat == "bins" else None
    skipped = [f"ledger line {p!r}" for p in (gbdt_dp.PRIOR_PURPOSE, gbdt_dp_init.STEPS_PURPOSE,
                                              scorecard_dp.STEPS_PURPOSE) if p in found]
    if guide is not None and audited_guides is None:
        skipped.append(f"ledger line {gbdt_dp.GUIDE_PURPOSE!r} (guide_stat {guide_stat!r})")
    return TreeMechanism(
        depth=depth, trees=leaves.steps if leaves else 0,
        sample_rate=leaves.sample_rate if leaves else 1.0,
        noise_multiplier=leaves.noise_multiplier if leaves else 0.0,
        hessian_noise=hessian_noise,
        guides=audited_guides.steps if audited_guides else 0,
        guide_noise_multiplier=audited_guides.noise_multiplier if audited_guides else 0.0,
        counts=1 if counts else 0,
        count_noise_multiplier=counts.noise_multiplier if counts else 0.0,
        columns=columns, accountant=accountant,
        not_audited=(*skipped, "the silos' preparation statistics", "the DP calibration"))


# ---- replaying each release with the run's own noising function -----------------------------


@dataclass(frozen=True)
class Observed:
    """One kind of release as the auditor sees it: per release, the projection u of every
    canary's cells (releases, m), the release's whitened multiplier and sampling rate."""

    u: np.ndarray
    sigma: float
    sample_rate: float

    def log_lr(self) -> np.ndarray:
        return log_likelihood_ratios(self.u, self.sigma, 1, self.sample_rate).sum(axis=0)


def project(parts: Sequence[tuple[np.ndarray, float, float]]) -> tuple[np.ndarray, float]:
    """Each canary's cells (arrays of shape (releases, cells, m), with the canary's
    contribution per cell and the claimed noise std per cell) projected on its contribution,
    whitened: (u of shape (releases, m), u's std when out). Without noise: the plain
    projection, exactly the number of times the canary was in."""
    noisy = all(std > 0 for _, _, std in parts)
    num, den = 0.0, 0.0
    for cells, mu, std in parts:
        w = mu / std**2 if noisy else mu
        num = num + w * cells.sum(axis=1)
        den += w * mu * cells.shape[1]
    sigma = 1.0 / math.sqrt(sum(mu**2 / std**2 * c.shape[1] for c, mu, std in parts)
                            ) if noisy else 0.0
    return np.asarray(num) / den, sigma


def replay_leaves(included: np.ndarray, mech: TreeMechanism, batches: np.random.Generator,
                  noise: np.random.Generator) -> Observed:
    """The leaf sums of `mech.trees` trees: per tree a Poisson sample of the included
    canaries and `gbdt_dp.noisy_sums` over auditor trees of the run's depth, one canary per
    leaf."""
    m = included.size
    params = gbdt_dp.DpTreeParams(depth=mech.depth, hessian_noise=mech.hessian_noise,
                                  trees=1)
    s_g, s_h = split_gh(mech.noise_multiplier, mech.hessian_noise)
    release = replace(gbdt_dp.plan_noise(params, epsilon_=math.inf, delta=0.5),
                      noise_multiplier=mech.noise_multiplier, gradient_noise_multiplier=s_g,
                      hessian_noise_multiplier=s_h)
    cells = 2**mech.depth
    groups = -(-m // cells)
    g_obs = np.empty((mech.trees, 1, groups * cells))
    h_obs = np.empty_like(g_obs)
    for t in range(mech.trees):
        # The run's row sample, restricted to the included canaries.
        taken = gbdt_dp.row_sample(batches, m, mech.sample_rate)
        rows = np.flatnonzero(taken & included)
        bounds = np.searchsorted(rows, np.arange(groups + 1) * cells)
        for j in range(groups):
            mine = rows[bounds[j]:bounds[j + 1]] - j * cells
            g, h = gbdt_dp.noisy_sums(np.full(mine.size, CANARY_G), np.full(mine.size, CANARY_H),
                                      mine, params, release, noise)
            g_obs[t, 0, j * cells:(j + 1) * cells] = g
            h_obs[t, 0, j * cells:(j + 1) * cells] = h
    u, sigma = project([(g_obs[:, :, :m], CANARY_G, s_g * CANARY_G),
                        (h_obs[:, :, :m], CANARY_H, s_h * CANARY_H)])
    return Observed(u, sigma, mech.sample_rate)


def _own_cells(rows: np.ndarray, columns: int) -> np.ndarray:
    """(rows, columns): each included canary's own bin (its index) in every column."""
    return np.repeat(rows[:, None], columns, axis=1)


def replay_guides(included: np.ndarray, mech: TreeMechanism, noise: np.random.Generator
                  ) -> Observed:
    """The split histograms of `mech.guides` stages: `gbdt_dp_guide.noisy_histograms` on the
    canaries, each in its own bin of every column, over everyone (no sampling)."""
    m, d = included.size, mech.columns
    s_g, s_h = split_gh(mech.guide_noise_multiplier, mech.hessian_noise)
    rows = np.flatnonzero(included)
    binned = gbdt_dp_guide.Binned(tuple(("audit", f) for f in range(d)), _own_cells(rows, d))
    g, h = np.full(rows.size, CANARY_G), np.full(rows.size, CANARY_H)
    g_obs = np.empty((mech.guides, d, m))
    h_obs = np.empty_like(g_obs)
    for k in range(mech.guides):
        g_obs[k], h_obs[k] = gbdt_dp_guide.noisy_histograms(
            binned, g, h, m, (s_g, s_h) if s_g > 0 else None, noise)
    u, sigma = project([(g_obs, CANARY_G, s_g * math.sqrt(d) * CANARY_G),
                        (h_obs, CANARY_H, s_h * math.sqrt(d) * CANARY_H)])
    return Observed(u, sigma, 1.0)


def replay_counts(included: np.ndarray, mech: TreeMechanism, noise: np.random.Generator
                  ) -> tuple[np.ndarray, float]:
    """The counts of the first additive stage / the DP scorecard: `scorecard_dp.noisy_counts`
    on the canaries as defaulters, each in its own pre-bin of every column. (columns, m)
    noisy defaulter counts (held to >= 0 by the release) and the claimed std."""
    m, f = included.size, mech.columns
    rows = np.flatnonzero(included)
    c = mech.count_noise_multiplier
    # noisy_counts reads the count multiplier and `private` (the steps' multiplier > 0) only.
    release = scorecard_dp.DpScorecardRelease(
        accountant=mech.accountant, target_epsilon=math.inf, epsilon=math.inf, delta=0.5,
        count_noise_multiplier=c, noise_multiplier=c, gradient_noise_multiplier=c,
        hessian_noise_multiplier=c, steps=1)
    counts = scorecard_dp.noisy_counts({"audit": _own_cells(rows, f)}, np.ones(rows.size), m,
                                       release, noise)
    bad, _people = counts["audit"]
    return bad, c * math.sqrt(f)


def counts_log_lr(bad: np.ndarray, std: float) -> np.ndarray:
    """Per canary, the counts release's log likelihood ratio, in (1 per column) against out,
    of noisy counts clamped at 0: (x - 1/2) / s^2 for x > 0, log P[N(1, s^2) <= 0] /
    P[N(0, s^2) <= 0] for x = 0 (s in units of the canary's 1)."""
    per_cell = np.where(bad > 0, (bad - 0.5) / std**2, log_ndtr(-1.0 / std) + math.log(2.0))
    return per_cell.sum(axis=0)


def canary_scores(included: np.ndarray, mech: TreeMechanism, statistic: str,
                  rng: np.random.Generator) -> np.ndarray:
    """Every canary's score (high: included) from the replayed releases. The noise and the
    samples come from fresh secrets drawn from the auditor's `rng`; the auditor reads only
    the releases."""
    noise = SecretRandom(rng.bytes(SECRET_BYTES)).generator("audit-noise")
    batches = SecretRandom(rng.bytes(SECRET_BYTES)).generator("audit-batches")
    likelihood = statistic == "likelihood" and mech.private
    seen: list[Observed] = []
    score = np.zeros(included.size)
    if mech.counts:
        bad, std = replay_counts(included, mech, noise)
        score += counts_log_lr(bad, std) if likelihood else bad.mean(axis=0)
    if mech.guides:
        seen.append(replay_guides(included, mech, noise))
    if mech.trees:
        seen.append(replay_leaves(included, mech, batches, noise))
    for observed in seen:
        score += observed.log_lr() if likelihood else observed.u.sum(axis=0)
    return score


def tree_audit(mech: TreeMechanism, *, delta: float, rng: np.random.Generator,
               canaries: int = CANARIES, beta: float = DEFAULT_BETA,
               guesses: Sequence[tuple[int, int]] | None = None,
               statistic: str = "likelihood", account: bool = True) -> dict:
    """Audit `mech` with `canaries` white-box canaries (module docstring): the lower bound on
    epsilon at confidence 1 - beta against `delta`, the guesses behind it, what was audited,
    and (`account`) the accountant's epsilon of the audited releases alone, the tightest
    claim the audit tests. `rng`: the auditor's coins and the secrets of the replay."""
    start = time.perf_counter()
    m = int(canaries)
    if m < 2:
        raise ValueError(f"the audit needs at least 2 canaries, got {canaries}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    pairs = list(guesses) if guesses is not None else default_guesses(m)
    included = rng.random(m) < 0.5  # the auditor's secret coins
    scores = canary_scores(included, mech, statistic, rng)
    best = best_bound(scores, included, pairs, delta, beta, rng)
    audited = (accounted_epsilon(mech.accountant, mech.history(), delta)
               if account and mech.private else math.inf)
    result = {
        **bound_summary(best, canaries=m, hypotheses=len(pairs), beta=beta, delta=delta),
        "method": METHOD,
        "audited": mech.describe(),
        "not_audited": list(mech.not_audited),
        "statistic": statistic if mech.private else "sum",
        # The leaves' figures under the keys the DP-SGD audit's report reads.
        "noise_multiplier": mech.noise_multiplier,
        "blocks": 1,
        "sample_rate": mech.sample_rate,
        "steps": mech.trees,
        "hessian_noise": mech.hessian_noise,
        "guides": mech.guides,
        "guide_noise_multiplier": mech.guide_noise_multiplier,
        "count_noise_multiplier": mech.count_noise_multiplier,
        "columns": mech.columns,
        "audited_accounted_epsilon": audited if math.isfinite(audited) else None,
        "seconds": round(time.perf_counter() - start, 3),
    }
    logger.info("tree canary audit: eps_lower %.3f at %.0f %% (%d/%d correct; %d canaries) "
                "of %s; the audited releases account for %.4g; %.1f s",
                result["epsilon_lower_bound"], 100 * result["confidence"], result["correct"],
                result["guesses"], m, result["audited"], audited, result["seconds"])
    return result
