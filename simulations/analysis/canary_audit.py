"""One-run privacy audit of the joint DP-SGD with white-box Dirac gradient canaries.

Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run" (NeurIPS;
arXiv:2305.08846). The accountant gives an UPPER bound on the privacy loss; this audit gives a
LOWER bound that holds with confidence 1 - beta from a single training run. It must certify a
clearly positive bound on a non-private run and never exceed the accounted epsilon on a private
one; if it ever does, the implementation (clipping, noise, sampling) or the accounting is broken.

The game (their Algorithm 1, white-box with gradient canaries as in their DP-SGD auditor):

* m canaries; the auditor flips a fair secret coin per canary: included or not. The coins are
  independent of everything else, which is what lets one run stand for m trials: the paper
  bounds the number of correct guesses about these coins (an (eps, delta)-DP mechanism is
  "randomised response" for each coin at best), not the behaviour of independent people.
* Each canary is a "Dirac" gradient canary: in every party's block it has one dedicated
  coordinate, and its per-sample gradient is non-zero there only. Real data never touches those
  coordinates (they are parameters real rows' gradients leave at zero), so the noisy sums on
  them are exactly what the joint mechanism releases there with or without the real rows; the
  real rows are therefore omitted from the simulation (they would change nothing on these
  coordinates, and per-sample clipping is per row).
* The mechanism is the project's joint DP-SGD: K parties (blocks) share one Poisson batch (rate
  q) per step for T steps; each party clips its per-sample block at C and adds Gaussian noise
  of std sigma_block * C from its own secret stream (combined noise multiplier
  sigma_block / sqrt(K)). Every block's step goes through the code that trains:
  `clients.protocol.dp_sgd.make_private` and `SecretNoiseDPOptimizer`, with Opacus computing the
  canaries' per-sample gradients and clipping them. A canary's raw gradient is
  `canary_gradient_scale` times C, so only working clipping keeps it at C (a broken clip shows up as
  a bound above the accountant's).
* The white-box auditor observes every step's noisy summed gradient of every block and scores
  each canary from its coordinates (`statistic`): "sum", the sum over steps and blocks (in units
  of C), or, by default, "likelihood", the sum over steps of the log likelihood ratio of the
  block-summed coordinate y_t, included against excluded: log(1 - q + q exp((y_t - K/2) /
  sigma_block^2)). The sum lets the ~T(1 - q) steps that did not sample a canary bury the few
  that did in noise; the likelihood ratio (Neyman-Pearson for one step of the subsampled
  Gaussian) weighs each step by the evidence it carries. At the default run's parameters it
  certifies about 5x more at accounted epsilon 8 (1.0-1.4 against 0.1-0.3 over three seeds).
  At sigma 0 both are the sum. Guess "included" for the k+ highest scores, "excluded" for the
  k- lowest, abstain on the rest; count the correct guesses.
* Lower bound: `epsilon_lower_bound` (Corollary 5.4 of arXiv:2305.08846v1 as its Appendix D
  computes it; see there). The auditor tries a few (k+, k-) fixed beforehand (`default_guesses`)
  and reports the best bound, each computed at level beta / (number of tries): a Bonferroni
  (union) correction, so the reported bound is wrong with probability at most beta overall.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy.special import bdtrc, expit, gammaln, xlog1py, xlogy
from torch import nn

from clients.protocol.dp_sgd import (
    SecretNoiseDPOptimizer,
    make_private,
    mark_empty_batch,
    noised_step,
)
from crypto.secret_random import SECRET_BYTES, SecretRandom
from simulations.analysis.baselines import one_thread

logger = logging.getLogger(__name__)

METHOD = "one-run canary audit, white-box Dirac gradient canaries (Steinke, Nasr, Jagielski 2023)"
DEFAULT_BETA = 0.05
# A canary's raw per-sample gradient is this many times the clipping norm C: Opacus must clip
# it to C, so the audit also tests the clipping.
CANARY_GRADIENT_SCALE = 4.0
# Bisection steps of the search for epsilon (Appendix D uses 30 on a bracket of width 1).
BISECTION_STEPS = 30
STATISTICS = ("likelihood", "sum")


# ---- the bound --------------------------------------------------------------------------------


def _check_counts(m: int, r: int, v: int) -> None:
    if not all(isinstance(x, (int, np.integer)) for x in (m, r, v)):
        raise ValueError(f"m, r and v must be whole numbers, got m={m!r}, r={r!r}, v={v!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got v={v}, r={r}, m={m}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] under (epsilon, delta)-DP, m canaries.

    Corollary 5.4 of Steinke, Nasr, Jagielski (arXiv:2305.08846v1), as computed by their
    Appendix D (`p_value_DP_audit`): with W ~ Binomial(r, e^eps / (1 + e^eps)) (each guess is at
    best eps-DP randomised response about its coin),

        P[W' >= v] <= P[W >= v] + 2 m delta * max_{1 <= i <= v} P[v > W >= v - i] / i.

    Vectorised over i (their per-i loop is a cumulative sum)."""
    _check_counts(m, r, v)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = float(expit(epsilon))  # accuracy of eps-DP randomised response
    # scipy.special's functions, not scipy.stats.binom: the bisection calls this thousands of
    # times, and binom's argument handling cost 90 % of each call (same values to 1e-12).
    tail = float(bdtrc(v - 1, r, q))  # P[W >= v] = P[W > v - 1]
    alpha = 0.0
    if v > 0 and delta > 0:
        i = np.arange(1, v + 1)
        below = np.cumsum(_binom_pmf(v - i, r, q))  # P[v > W >= v - i], i = 1..v
        alpha = float(np.max(below / i))
    return min(tail + alpha * delta * 2 * m, 1.0)


def _binom_pmf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    """P[Binomial(n, p) = k], in log space (exact binomial coefficients would overflow)."""
    log_choose = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    return np.exp(log_choose + xlogy(k, p) + xlog1py(n - k, -p))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = DEFAULT_BETA
                        ) -> float:
    """The largest epsilon that v correct guesses out of r (m canaries) reject at level beta:
    the mechanism is not (epsilon, delta)-DP, with confidence 1 - beta.

    Appendix D's `get_eps_audit` of arXiv:2305.08846v1: raise an integer upper bracket while
    the p-value is still below beta, then bisect 30 times keeping p(lower end) < beta, and
    return the lower end (conservative). 0 when nothing can be rejected."""
    _check_counts(m, r, v)
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1) (0.05 for 95 % confidence), got {beta}")
    lo, hi = 0.0, 1.0  # p_value(lo) < beta or lo == 0; p_value(hi) >= beta
    while p_value(m, r, v, hi, delta) < beta:
        hi += 1.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def default_guesses(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs fixed before the run: 2 %, 5 %, 10 %, 20 % and 50 % of the canaries
    guessed, all "included" (k- = 0) or half each way. Few, so the Bonferroni price is small
    (level beta / 10 instead of beta)."""
    pairs: list[tuple[int, int]] = []
    for frac in (0.02, 0.05, 0.1, 0.2, 0.5):
        r = max(2, round(frac * m))
        pairs += [(r, 0), (r // 2, r - r // 2)]
    return pairs


def best_bound(scores: np.ndarray, included: np.ndarray, guesses: Sequence[tuple[int, int]],
               delta: float, beta: float, rng: np.random.Generator) -> dict:
    """Guess from the scores (high = included) for each (k+, k-) and return the best bound, each
    at level beta / len(guesses). Ties are broken at random (the auditor's own coins)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = scores.size
    if included.shape != (m,):
        raise ValueError("one inclusion coin per canary score")
    if not guesses:
        raise ValueError("at least one (k+, k-) pair of guesses")
    shuffle = rng.permutation(m)
    order = shuffle[np.argsort(-scores[shuffle], kind="stable")]  # highest first
    # Correct "included" among the top j and correct "excluded" among the bottom j, for every j.
    top_hits = np.concatenate([[0], np.cumsum(included[order])])
    bottom_hits = np.concatenate([[0], np.cumsum(~included[order[::-1]])])
    level = beta / len(guesses)
    best = {"epsilon": 0.0, "k_plus": 0, "k_minus": 0, "guesses": 0, "correct": 0}
    for k_plus, k_minus in guesses:
        if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
            raise ValueError(f"guesses (k+={k_plus}, k-={k_minus}) need 0 <= k+ + k- <= {m}")
        r, v = k_plus + k_minus, int(top_hits[k_plus] + bottom_hits[k_minus])
        eps = epsilon_lower_bound(m, r, v, delta, level)
        if eps > best["epsilon"] or best["guesses"] == 0:
            best = {"epsilon": eps, "k_plus": k_plus, "k_minus": k_minus, "guesses": r,
                    "correct": v}
    return best


def canary_scores(per_step: np.ndarray, statistic: str, sigma: float, blocks: int,
                  sample_rate: float) -> np.ndarray:
    """One score per canary from its observed coordinates, `per_step` of shape (T, m): each
    step's noisy gradient summed over the blocks, in units of C. High means "included"."""
    per_step = np.asarray(per_step, dtype=np.float64)
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if statistic == "sum" or sigma == 0 or sample_rate >= 1:
        return per_step.sum(axis=0)
    return log_likelihood_ratios(per_step, sigma, blocks, sample_rate).sum(axis=0)


def log_likelihood_ratios(observed: np.ndarray, sigma: float, blocks: int,
                          sample_rate: float) -> np.ndarray:
    """Per release, log P[observed | canary in] / P[observed | out] of one Poisson-subsampled
    Gaussian release: `observed` in units of one block's clipped contribution, out
    N(0, K sigma^2), in N(K, K sigma^2) with probability q (sigma > 0). Summed over
    independent releases it is the whole transcript's (Neyman-Pearson) statistic."""
    if not sigma > 0 or not 0 < sample_rate <= 1:
        raise ValueError(f"need sigma > 0 and sample_rate in (0, 1], got {sigma}, {sample_rate}")
    z = (np.asarray(observed, dtype=np.float64) - blocks / 2) / sigma**2
    if sample_rate >= 1:
        return z
    return np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + z)


# ---- the mechanism: the project's DP optimizer, one per block ---------------------------------


def _block(m: int, max_grad_norm: float, noise_multiplier: float, expected_batch: int
           ) -> tuple[nn.Linear, nn.Module, SecretNoiseDPOptimizer]:
    """One party's canary coordinates: a bias-free linear map with one weight per canary, so a
    canary's row (one-hot) has per-sample gradient only in its own coordinate."""
    base = nn.Linear(m, 1, bias=False, dtype=torch.float64)
    nn.init.zeros_(base.weight)
    opt = torch.optim.SGD(base.parameters(), lr=1.0)
    private, dp_opt = make_private(base, opt, noise_multiplier=noise_multiplier,
                                   max_grad_norm=max_grad_norm, expected_batch=expected_batch)
    return base, private, dp_opt


def run_mechanism(included: np.ndarray, *, noise_multiplier: float, blocks: int,
                  sample_rate: float, steps: int, max_grad_norm: float,
                  rng: np.random.Generator, expected_batch: int = 1,
                  canary_gradient_scale: float = CANARY_GRADIENT_SCALE) -> np.ndarray:
    """`steps` steps of the joint DP-SGD on the canaries `included` (one bool per canary); the
    white-box view, shape (steps, m): each step's noisy gradient on every canary's coordinate,
    summed over the blocks, in units of C. Each block's step runs through `make_private`'s
    Opacus per-sample gradients and clipping and `SecretNoiseDPOptimizer`'s noise."""
    included = np.asarray(included, dtype=bool)
    m = included.size
    # Each party's noise: one ChaCha20 stream per party for the whole run, keyed by a fresh
    # secret of its own (one stream per step, as training addresses them, costs an HKDF per
    # step and changes no draw's distribution).
    noise = [SecretRandom(rng.bytes(SECRET_BYTES)).generator("audit-noise", b)
             for b in range(blocks)]
    batches = SecretRandom(rng.bytes(SECRET_BYTES)).generator("audit-batches")
    # The shared Poisson batch of every step, restricted to the included canaries: (T, m).
    sampled = (batches.random((steps, m)) < sample_rate) & included

    models = [_block(m, max_grad_norm, noise_multiplier, expected_batch) for _ in range(blocks)]
    gain = canary_gradient_scale * max_grad_norm
    observed = torch.zeros((steps, m), dtype=torch.float64)  # per step, summed over blocks
    eye = torch.eye(m, dtype=torch.float64)
    with one_thread():  # tiny steps: a second OpenMP thread only waits (about 2x slower)
        for t in range(steps):
            rows = np.flatnonzero(sampled[t])
            x = eye[torch.from_numpy(rows)]
            for b, (base, private, opt) in enumerate(models):
                opt.zero_grad(set_to_none=True)
                if rows.size:
                    # mean reduction: Opacus scales d loss / d out (gain / n) back by n, so each
                    # canary row's per-sample gradient is gain in its own coordinate.
                    (gain * private(x).mean()).backward()
                else:  # an empty Poisson batch is still a step: noise only
                    mark_empty_batch(base)
                noised_step(opt, noise=noise[b])
                # The white-box view: the step's noisy sum (the optimizer divided it by
                # expected_batch, as training does).
                if base.weight.grad is None:  # cannot happen: the step noised it in
                    raise RuntimeError("the DP step left the canary weights without a gradient")
                observed[t] += base.weight.grad.detach().reshape(-1)
    per_step = observed.numpy() * (expected_batch / max_grad_norm)  # in units of C
    return per_step


def canary_audit(
    *,
    noise_multiplier: float,
    blocks: int,
    sample_rate: float,
    steps: int,
    max_grad_norm: float,
    delta: float,
    canaries: int = 1000,
    rng: np.random.Generator,
    beta: float = DEFAULT_BETA,
    guesses: Sequence[tuple[int, int]] | None = None,
    expected_batch: int = 1,
    canary_gradient_scale: float = CANARY_GRADIENT_SCALE,
    statistic: str = "likelihood",
) -> dict:
    """Audit `steps` steps of the joint DP-SGD (`blocks` parties, per-party noise multiplier
    `noise_multiplier` = sigma_block, Poisson rate `sample_rate`, clip `max_grad_norm`) with
    `canaries` white-box Dirac gradient canaries; see the module docstring.

    `rng` is the auditor's: its coins (inclusion, tie-breaking) and, through fresh secrets drawn
    from it, the simulated parties' noise and batch streams (the auditor never reads those).
    `expected_batch` is the optimizer's divisor under mean reduction; the auditor multiplies it
    back, so it changes nothing. `statistic` scores the canaries ("likelihood" or "sum", see the
    module docstring); `guesses` are the (k+, k-) pairs tried (default `default_guesses`).
    Returns epsilon_lower_bound (confidence 1 - beta, against `delta`), the guesses and correct
    guesses behind it, and the seconds taken."""
    start = time.perf_counter()
    m = int(canaries)
    _check_inputs(canaries=m, blocks=blocks, steps=steps, sample_rate=sample_rate,
                  noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, delta=delta,
                  canary_gradient_scale=canary_gradient_scale, statistic=statistic)
    pairs = list(guesses) if guesses is not None else default_guesses(m)

    included = rng.random(m) < 0.5  # the auditor's secret coins
    per_step = run_mechanism(included, noise_multiplier=noise_multiplier, blocks=blocks,
                             sample_rate=sample_rate, steps=steps, max_grad_norm=max_grad_norm,
                             rng=rng, expected_batch=expected_batch,
                             canary_gradient_scale=canary_gradient_scale)
    scores = canary_scores(per_step, statistic, noise_multiplier, blocks, sample_rate)

    best = best_bound(scores, included, pairs, delta, beta, rng)
    result = {
        **bound_summary(best, canaries=m, hypotheses=len(pairs), beta=beta, delta=delta),
        "statistic": statistic if noise_multiplier > 0 else "sum",
        **_mechanism(noise_multiplier, blocks, sample_rate, steps, max_grad_norm),
        "seconds": round(time.perf_counter() - start, 3),
    }
    _log_result(result)
    return result


def bound_summary(best: dict, *, canaries: int, hypotheses: int, beta: float,
                  delta: float) -> dict:
    """The lower bound and what it rests on: the best guess and its confidence."""
    return {
        "epsilon_lower_bound": best["epsilon"],
        "confidence": 1 - beta,
        "canaries": canaries,
        "guesses": best["guesses"],
        "correct": best["correct"],
        "k_plus": best["k_plus"],
        "k_minus": best["k_minus"],
        "hypotheses": hypotheses,
        "delta": float(delta),
        "method": METHOD,
    }


def _check_inputs(*, canaries: int, blocks: int, steps: int, sample_rate: float,
                  noise_multiplier: float, max_grad_norm: float, delta: float,
                  canary_gradient_scale: float, statistic: str) -> None:
    """Refuse an audit whose mechanism or guesses are not what the proof is about."""
    if canaries < 2:
        raise ValueError(f"the audit needs at least 2 canaries, got {canaries}")
    if blocks < 1 or steps < 0:
        raise ValueError(f"need blocks >= 1 and steps >= 0, got {blocks} and {steps}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if canary_gradient_scale < 1:
        raise ValueError("canary_gradient_scale must be >= 1 (the clip must bind)")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def _mechanism(noise_multiplier: float, blocks: int, sample_rate: float, steps: int,
               max_grad_norm: float) -> dict:
    """The audited mechanism, as the result describes it."""
    return {
        "audited": (f"joint DP-SGD: {steps} steps of {blocks} blocks at q {sample_rate:.4g}, "
                    f"noise multiplier {noise_multiplier:.4g} per block"),
        "noise_multiplier": float(noise_multiplier),
        "combined_noise_multiplier": float(noise_multiplier) / math.sqrt(blocks),
        "blocks": int(blocks),
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "max_grad_norm": float(max_grad_norm),
    }


def _log_result(result: dict) -> None:
    logger.info(
        "canary audit: eps_lower %.3f at %.0f %% (%d/%d correct, k+ %d, k- %d; %d canaries, "
        "sigma %.4g x %d blocks, q %.4g, %d steps) in %.1f s",
        result["epsilon_lower_bound"], 100 * result["confidence"], result["correct"],
        result["guesses"], result["k_plus"], result["k_minus"], result["canaries"],
        result["noise_multiplier"], result["blocks"], result["sample_rate"], result["steps"],
        result["seconds"],
    )
