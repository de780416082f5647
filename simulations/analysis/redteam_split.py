"""Red-team attack 2 (overview in redteam.py): labels from the split and evaluation pattern.

Split / evaluation pattern: which positions appear in plans and in eval messages. Two
attacks: pattern statistics (how often a position is sampled, whether it is evaluated), and
a Bayesian replay of the OLD stratified split from the public seed (`stratified_replay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, logsumexp

from simulations.analysis.redteam import SiloView
from simulations.analysis.redteam_seed import SPLIT_SALT, old_split_sizes


def pattern_attack(view: SiloView) -> np.ndarray:
    """Per position: how often it was sampled into a plan, plus 0.5 if an eval message that did
    not cover everyone named it. Any split, sampling or evaluation that depends on labels shows
    up here (higher or lower for defaulters: scored as |AUC - 0.5|)."""
    n = view.n_positions
    score = np.zeros(n)
    for plan in view.plans():
        score += np.bincount(plan, minlength=n)
    for ev in view.evals():
        if len(np.unique(ev)) < n:
            score[ev] += 0.5
    return score


@dataclass
class ReplayResult:
    """The stratified-split replay: P(y = 1) per position, P(old mechanism | what was seen),
    and the candidate defaulter counts that survived."""

    probability: np.ndarray
    p_old: float
    survivors: list[int]


def _observations(view: SiloView, poisson: bool, steps: int, q: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per position an observation (0 sampled in a plan, 1 in a partial eval only, 2 neither)
    and the emission matrix E[o, c] for split code c (0 train, 1 val, 2 test). Under Poisson
    sampling a training person is never sampled with probability (1 - q)^steps."""
    n = view.n_positions
    planned = np.zeros(n, dtype=bool)
    for plan in view.plans():
        planned[plan] = True
    partial = [ev for ev in view.evals() if len(np.unique(ev)) < n]
    evaluated = np.zeros(n, dtype=bool)
    for ev in partial:
        evaluated[ev] = True
    obs = np.where(planned, 0, np.where(evaluated, 1, 2)).astype(np.int8)
    miss = (1 - q) ** steps if poisson else 0.0
    emit = np.zeros((3, 3))
    emit[0, 0], emit[2, 0] = 1 - miss, miss
    if partial:
        emit[1, 1], emit[2, 2] = 1.0, 1.0
    else:
        emit[2, 1], emit[2, 2] = 1.0, 1.0
    return obs, emit


def _rank_codes(n0: int, n1: int, seed: int, train: float, val: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """The old split's code (0/1/2) of the r-th smallest position of each class, for a guessed
    class size: `permutation` of a class's sorted positions depends only on their count."""
    rng = np.random.default_rng([seed, SPLIT_SALT])
    out = []
    for m in (n0, n1):
        perm = rng.permutation(m)
        nt, nv, _ = old_split_sizes(m, train, val)
        codes = np.empty(m, dtype=np.int8)
        codes[perm[:nt]], codes[perm[nt:nt + nv]], codes[perm[nt + nv:]] = 0, 1, 2
        out.append(codes)
    return out[0], out[1]


def _interleave(obs: np.ndarray, emit: np.ndarray, a: np.ndarray, b: np.ndarray,
                null: np.ndarray, stop: float, check: int = 64
                ) -> tuple[float, np.ndarray | None]:
    """Forward-backward over the ways of interleaving the two classes' rank codes `a` (class 0)
    and `b` (class 1) along the positions, each path weighted by the emissions of what was
    observed. Returns log P(observations | this class size, old mechanism) (uniform over
    labelings with len(b) ones) and P(position is class 1); stops early (None) once the log
    Bayes factor against `null` (per-position log-likelihoods under an independent split)
    falls below -`stop`."""
    n, n0, n1 = len(obs), len(a), len(b)
    ea = [emit[o][a] for o in range(3)]  # emission of class-0 rank i for observation o
    eb = [emit[o][b] for o in range(3)]
    log_c = gammaln(n + 1) - gammaln(n1 + 1) - gammaln(n0 + 1)
    null_cum = np.concatenate([[0.0], np.cumsum(null)])
    lo, alpha, logz = 0, np.ones(1), 0.0
    saved: list[tuple[int, np.ndarray]] = []
    for p in range(n):
        saved.append((lo, alpha))
        hi = lo + len(alpha) - 1
        o = obs[p]
        new = np.zeros(len(alpha) + 1)
        j0, j1 = max(lo, p - n0 + 1), min(hi, p)  # class-0 move: rank i = p - j < n0
        if j0 <= j1:
            new[j0 - lo:j1 - lo + 1] += alpha[j0 - lo:j1 - lo + 1] * ea[o][p - j1:p - j0 + 1][::-1]
        k1 = min(hi, n1 - 1)  # class-1 move: rank j < n1
        if lo <= k1:
            new[1:k1 - lo + 2] += alpha[:k1 - lo + 1] * eb[o][lo:k1 + 1]
        nz = np.flatnonzero(new)
        if len(nz) == 0:
            return -math.inf, None
        lo, alpha = lo + nz[0], new[nz[0]:nz[-1] + 1]
        total = alpha.sum()
        alpha, logz = alpha / total, logz + math.log(total)
        if (p + 1) % check == 0:
            # log P(first p+1 observations | n1): a path with j ones so far leaves
            # C(n - p - 1, n1 - j) completions of the labeling out of C(n, n1).
            j = np.arange(lo, lo + len(alpha))
            rest = n - p - 1
            ok = (n1 - j >= 0) & (n1 - j <= rest)
            if not ok.any():
                return -math.inf, None
            ways = (gammaln(rest + 1) - gammaln(n1 - j[ok] + 1) - gammaln(rest - n1 + j[ok] + 1))
            with np.errstate(divide="ignore"):
                partial = logz + logsumexp(np.log(alpha[ok]) + ways) - log_c
            if partial - null_cum[p + 1] < -stop:
                return -math.inf, None
    if not lo <= n1 < lo + len(alpha) or alpha[n1 - lo] == 0:
        return -math.inf, None
    loglik = logz + math.log(alpha[n1 - lo]) - log_c
    # Backward: beta(j) = weighted completions from (p, j) to (n, n1).
    post = np.zeros(n)
    blo, beta = n1, np.ones(1)

    def at(lo_: int, arr: np.ndarray, start: int, length: int) -> np.ndarray:
        out = np.zeros(length)
        s, e = max(start, lo_), min(start + length, lo_ + len(arr))
        if s < e:
            out[s - start:e - start] = arr[s - lo_:e - lo_]
        return out

    for p in range(n - 1, -1, -1):
        lo_p, al = saved[p]
        width = len(al)
        j = np.arange(lo_p, lo_p + width)
        o = obs[p]
        i = p - j
        w0 = np.where((i >= 0) & (i < n0), ea[o][np.clip(i, 0, n0 - 1)], 0.0)
        w1 = np.where(j < n1, eb[o][np.clip(j, 0, n1 - 1)], 0.0)
        stay, up = at(blo, beta, lo_p, width), at(blo, beta, lo_p + 1, width)
        m0, m1 = al * w0 * stay, al * w1 * up
        denom = m0.sum() + m1.sum()
        post[p] = m1.sum() / denom if denom > 0 else 0.0
        new_beta = w0 * stay + w1 * up
        top = new_beta.max()
        if top == 0:
            return loglik, None
        blo, beta = lo_p, new_beta / top
    return loglik, post


def stratified_replay(view: SiloView, config: dict, stop: float = 30.0,
                      max_candidates: int = 400) -> ReplayResult:
    """Replay the OLD stratified split (`np.random.default_rng([seed, 0x5917])` permuting each
    class's positions, cut train / val / test) from the public seed and ask which labelings
    explain the positions seen in plans and eval messages.

    For every guessed number of defaulters n1 (from the public default rate, most likely
    first), a forward-backward pass over the interleavings of the two classes' replayed codes
    gives P(what was seen | n1) and, per position, P(defaulter). Against the null of an
    independent split (today's mechanism) this is a Bayes factor; a guess whose running factor
    falls below e^-stop is dropped. Output: P(y=1) = P(old) * posterior + P(new) * rate."""
    n = view.n_positions
    seed = int(config["seed"])
    train, val = float(config["split.train"]), float(config["split.val"])
    rate = float(config.get("population.default_rate", 0.06))
    poisson = math.isfinite(float(config["privacy.epsilon"]))
    n_train_guess = max(1, round(train * n))
    q = min(1.0, int(config["train.batch_size"]) / n_train_guess)
    steps = int(config["train.epochs"]) * max(1, round(1 / q))
    obs, emit = _observations(view, poisson, steps, q)
    prior_codes = np.array([train, val, 1 - train - val])
    null = np.log(emit[obs] @ prior_codes)
    mean, sd = n * rate, math.sqrt(n * rate * (1 - rate))
    span = int(4 * sd) + 1
    candidates = sorted(range(max(1, int(mean) - span), min(n - 1, int(mean) + span) + 1),
                        key=lambda k: abs(k - mean))[:max_candidates]
    must = np.bincount(obs, minlength=3)
    weights, posts, survivors = [], [], []
    for n1 in candidates:
        n0 = n - n1
        sizes = np.add(old_split_sizes(n0, train, val), old_split_sizes(n1, train, val))
        # Counts first: a sampled position is a training one, so there must be enough of them.
        if sizes[0] < must[0] or (not poisson and sizes[0] != must[0]):
            continue
        a, b = _rank_codes(n0, n1, seed, train, val)
        loglik, post = _interleave(obs, emit, a, b, null, stop)
        if post is None:
            continue
        log_prior = (gammaln(n + 1) - gammaln(n1 + 1) - gammaln(n0 + 1)
                     + n1 * math.log(rate) + n0 * math.log(1 - rate))
        weights.append(loglik + log_prior)
        posts.append(post)
        survivors.append(n1)
    null_total = float(null.sum())
    if not weights:
        return ReplayResult(np.full(n, rate), 0.0, [])
    w = np.array(weights)
    log_old = logsumexp(w)  # P(obs | old), equal prior odds on old and new
    p_old = float(1 / (1 + math.exp(min(700.0, null_total - log_old))))
    mix = np.exp(w - log_old) @ np.array(posts)
    return ReplayResult(p_old * mix + (1 - p_old) * rate, p_old, survivors)
