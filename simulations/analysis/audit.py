"""Secondary empirical privacy audit: the loss-threshold membership attack on released scores.

The primary audit is the one-run canary audit in simulations/analysis/canary_audit.py
(Steinke, Nasr, Jagielski 2023), which audits the DP-SGD mechanism itself and can tell DP from
no DP. This attack on the released scores stays as a sanity check of what a scores recipient
sees; see the caveat below for why its bound is not a proof.

The accountant gives an UPPER bound on the privacy loss of training; an attack gives a LOWER
bound. If the attack ever "proves" more than the accountant allows, the implementation (or the
accounting) is broken. Design doc: "Empirical audit".

Why an attack bounds epsilon (Jagielski, Ullman, Oprea 2020, "Auditing differentially private
machine learning: how private is private SGD?", NeurIPS). Any test that tells "trained with
person x" (member) from "trained without x" (non-member) is a hypothesis test, and an
(eps, delta)-DP mechanism forces every such test to satisfy both

    TPR <= e^eps * FPR + delta        and        (1 - FPR) <= e^eps * (1 - TPR) + delta

(the second is the first applied to the complementary decision with the roles swapped; Kairouz,
Oh, Viswanath 2015). So a measured (TPR, FPR) implies
eps >= max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR))).

The attack here is the loss threshold (Yeom et al. 2018): guess "member" when loss <= t.

Keeping the bound honest:

* Measured rates are estimates, so we use exact Clopper-Pearson bounds: a LOWER bound on TPR and
  an UPPER bound on FPR, each two-sided at level alpha (so each one-sided bound fails with
  probability at most alpha / 2, and the union bound gives 1 - alpha jointly). Both directions
  above are monotone in the same two quantities (TPR up, FPR down), so taking the larger of the
  two costs no extra confidence.
* Choosing the threshold that looks best on the very data that is then scored is a
  multiple-comparisons artefact (with thousands of thresholds one of them fluctuates high). We
  split members and non-members at random into halves: the threshold is chosen on the selection
  half (maximising the same Clopper-Pearson bound there, which, unlike the point estimate,
  does not reward thresholds that catch a handful of examples with zero false positives), and
  the bound is computed once, on the evaluation half. When member and non-member losses come
  from one distribution the claimed epsilon is therefore positive with probability <= alpha.

Caveat. The guarantee above is per trial of the mechanism. Jagielski et al. train many models
(one trial each); scoring many members of ONE trained model treats examples as independent
trials, which DP does not strictly license. Steinke, Nasr, Jagielski 2023 ("Privacy auditing
with one (1) training run", NeurIPS) make the one-run audit rigorous by including each canary
independently at random and bounding the number of correct guesses;
simulations/analysis/canary_audit.py does that, and is the audit that must be a proof rather
than a sanity check. Either way, a loss-threshold attack is weak, so the bound is typically far
below the accounted epsilon: it can expose a broken implementation, not certify a tight one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta

from clients.protocol.metrics import auc

logger = logging.getLogger(__name__)

# Below this many examples per side each half holds < 10, and the Clopper-Pearson bounds are so
# wide that no epsilon can be claimed: reject rather than silently report 0.
MIN_PER_SIDE = 20
# Candidate thresholds at most: beyond this, evenly spaced ranks of the distinct losses. The
# Clopper-Pearson bounds cost a beta quantile per candidate (about 4 s for the 400,000 distinct
# losses of a million-person run); 4096 ranks resolve rates to 1/4096, far below the bounds'
# own width at these sizes. The evaluation half stays untouched, so the bound stays honest.
MAX_THRESHOLDS = 4096
# Probabilities are clipped so a memorised example (p == 1.0 in float32) has a finite loss.
DEFAULT_CLIP = 1e-12

FloatOrArray = float | np.ndarray


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one membership audit (rates are on the evaluation half)."""

    attack_auc: float
    epsilon_lower: float
    threshold: float
    tpr: float
    fpr: float
    n_members: int
    n_nonmembers: int
    confidence: float
    delta: float

    def to_dict(self) -> dict:
        return asdict(self)


def per_example_loss(
    labels: np.ndarray, probabilities: np.ndarray, clip: float = DEFAULT_CLIP
) -> np.ndarray:
    """Binary cross-entropy of each example, with probabilities clipped to [clip, 1 - clip]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    # (n,) against (n, 1) would broadcast to (n, n) and audit nonsense: insist on equal shapes.
    if y.shape != p.shape:
        raise ValueError(
            f"labels have shape {y.shape} but probabilities {p.shape}; pass arrays of the same "
            "shape (e.g. probabilities.ravel())"
        )
    if not (np.all(np.isfinite(y)) and np.all((y >= 0) & (y <= 1))):
        raise ValueError("labels must be finite values in [0, 1] (0 = good, 1 = default)")
    if not (np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))):
        raise ValueError(
            "probabilities must be finite and in [0, 1]; pass sigmoid(logits), not logits"
        )
    if not 0 < clip < 0.5:
        raise ValueError(f"clip must be in (0, 0.5), got {clip}")
    p = np.clip(p, clip, 1 - clip)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (0.05 for 95 % confidence), got {alpha}")


def _check_delta(delta: float) -> None:
    if not 0 <= delta < 1:
        raise ValueError(
            f"delta must be in [0, 1) (the accountant's delta, e.g. 1/N), got {delta}"
        )


def clopper_pearson(
    successes: np.ndarray | int, trials: np.ndarray | int, alpha: float
) -> tuple[FloatOrArray, FloatOrArray]:
    """Exact two-sided (1 - alpha) confidence interval for a binomial proportion.

    Vectorised over broadcastable `successes` and `trials`; floats for scalar inputs."""
    _check_alpha(alpha)
    k = np.asarray(successes)
    n = np.asarray(trials)
    if not (_is_integral(k) and _is_integral(n)):
        raise ValueError("successes and trials must be whole numbers (counts)")
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need trials >= 1 and 0 <= successes <= trials")
    k, n = np.broadcast_arrays(k.astype(np.float64), n.astype(np.float64))
    # beta.ppf is undefined at a shape parameter of 0; the limits there are exactly 0 and 1.
    lo = np.where(k == 0, 0.0, beta.ppf(alpha / 2, np.maximum(k, 1), n - k + 1))
    hi = np.where(k == n, 1.0, beta.ppf(1 - alpha / 2, k + 1, np.maximum(n - k, 1)))
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def _is_integral(x: np.ndarray) -> bool:
    if np.issubdtype(x.dtype, np.integer):
        return True
    return bool(np.issubdtype(x.dtype, np.floating) and np.all(np.isfinite(x))
                and np.all(x == np.round(x)))


def _epsilon_one_direction(
    tpr_low: FloatOrArray, fpr_high: FloatOrArray, delta: float
) -> np.ndarray:
    """max(0, log((tpr_low - delta) / fpr_high)) elementwise; inf when fpr_high is 0."""
    gain = tpr_low - delta
    with np.errstate(all="ignore"):  # x / 0 and overflow mean inf, 0 / 0 is handled below
        eps = np.log(gain / fpr_high)
    eps = np.where(gain <= 0, 0.0, eps)  # covers 0/0 too: nothing can be claimed
    return np.maximum(eps, 0.0)


def _epsilon_both_directions(
    tpr_low: FloatOrArray, fpr_high: FloatOrArray, delta: float
) -> np.ndarray:
    """The larger bound of the two DP inequalities; the second uses TNR >= 1 - fpr_high and
    FNR <= 1 - tpr_low, which hold on the same confidence event as the first."""
    return np.maximum(
        _epsilon_one_direction(tpr_low, fpr_high, delta),
        _epsilon_one_direction(1 - fpr_high, 1 - tpr_low, delta),
    )


def empirical_epsilon(tpr_low: float, fpr_high: float, delta: float) -> float:
    """Smallest epsilon consistent with TPR >= tpr_low and FPR <= fpr_high at this delta.

    0 when tpr_low <= delta (nothing can be claimed); inf when fpr_high is 0 and tpr_low > delta
    (no finite epsilon is consistent, which a Clopper-Pearson upper bound never produces)."""
    _check_delta(delta)
    for name, value in (("tpr_low", tpr_low), ("fpr_high", fpr_high)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be a rate in [0, 1], got {value}")
    return float(_epsilon_one_direction(np.float64(tpr_low), np.float64(fpr_high), delta))


def attack_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of 'member when loss is low': P(member loss < non-member loss), ties counted half
    (the Mann-Whitney statistic, from average ranks)."""
    is_nonmember = np.r_[np.zeros(member_losses.size), np.ones(nonmember_losses.size)]
    return auc(is_nonmember, np.concatenate([member_losses, nonmember_losses]))


def _validated_losses(losses: np.ndarray, side: str) -> np.ndarray:
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{side} losses must be a 1-D array, got shape {x.shape}; use .ravel()")
    if x.size == 0:
        raise ValueError(f"{side} losses are empty; pass one loss per {side} example")
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"{side} losses contain NaN or inf; clip probabilities first (per_example_loss does)"
        )
    if x.size < MIN_PER_SIDE:
        raise ValueError(
            f"only {x.size} {side} losses; the audit needs at least {MIN_PER_SIDE} per side "
            "(half select the threshold, half evaluate it): audit more examples"
        )
    return x


def _halves(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random split into (selection, evaluation); the evaluation half gets the odd one."""
    shuffled = rng.permutation(x)
    cut = x.size // 2
    return shuffled[:cut], shuffled[cut:]


def _counts_at_or_below(sorted_losses: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_losses, thresholds, side="right")


def _choose_threshold(
    members: np.ndarray, nonmembers: np.ndarray, delta: float, alpha: float
) -> float:
    """The threshold whose Clopper-Pearson epsilon bound on this (selection) half is largest;
    ties (typically all 0) go to the largest TPR - FPR, so the reported rates stay meaningful."""
    candidates = np.unique(np.concatenate([members, nonmembers]))
    if candidates.size > MAX_THRESHOLDS:
        candidates = candidates[np.linspace(0, candidates.size - 1, MAX_THRESHOLDS).astype(int)]
    tp = _counts_at_or_below(np.sort(members), candidates)
    fp = _counts_at_or_below(np.sort(nonmembers), candidates)
    tpr_low, _ = clopper_pearson(tp, members.size, alpha)
    _, fpr_high = clopper_pearson(fp, nonmembers.size, alpha)
    eps = _epsilon_both_directions(tpr_low, fpr_high, delta)
    youden = tp / members.size - fp / nonmembers.size
    best = np.lexsort((youden, eps))[-1]  # last key is the primary one
    return float(candidates[best])


def membership_audit(
    member_losses: np.ndarray,
    nonmember_losses: np.ndarray,
    delta: float,
    *,
    alpha: float = 0.05,
    seed: int = 0,
) -> AuditResult:
    """Loss-threshold membership inference and the epsilon lower bound it supports at
    confidence 1 - alpha (see the module docstring for why it is honest)."""
    members = _validated_losses(member_losses, "member")
    nonmembers = _validated_losses(nonmember_losses, "non-member")
    _check_delta(delta)
    _check_alpha(alpha)

    rng = np.random.default_rng(seed)
    sel_m, eval_m = _halves(members, rng)
    sel_n, eval_n = _halves(nonmembers, rng)
    threshold = _choose_threshold(sel_m, sel_n, delta, alpha)

    tp = int(np.count_nonzero(eval_m <= threshold))
    fp = int(np.count_nonzero(eval_n <= threshold))
    tpr_low, _ = clopper_pearson(tp, eval_m.size, alpha)
    _, fpr_high = clopper_pearson(fp, eval_n.size, alpha)
    eps = float(_epsilon_both_directions(np.float64(tpr_low), np.float64(fpr_high), delta))

    result = AuditResult(
        attack_auc=attack_auc(members, nonmembers),
        epsilon_lower=eps,
        threshold=threshold,
        tpr=tp / eval_m.size,
        fpr=fp / eval_n.size,
        n_members=members.size,
        n_nonmembers=nonmembers.size,
        confidence=1 - alpha,
        delta=float(delta),
    )
    logger.info(
        "membership audit: auc %.3f, eps_lower %.3f at %.0f %% (tpr %.3f, fpr %.3f, t %.4g)",
        result.attack_auc, eps, 100 * result.confidence, result.tpr, result.fpr, threshold,
    )
    return result
