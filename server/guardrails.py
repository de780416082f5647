"""Guardrails for small data, every model (issue 20 item 6): before any engine starts, a
configuration that cannot learn is refused and one that may learn little is warned about.

Every guardrail is a `Guardrail` (server/dp_guardrails.py): `check` names the figure judged,
`level` is "refuse" or "warn", and the message says, in one style, the figure, why it matters
and the fix, "<figure> (<what it is made of>): <why>; use <key>=<value> ..., or ...". A refusal
is overridden with privacy.guardrails=warn (machinery tests, deliberate studies).

- model.kind=mlp under DP-SGD: the sampling (`sampling_guardrails`: steps, sample rate,
  delta), then, once the authority has calibrated, the noise (server/privacy.py
  `PrivacyPlan.guardrails`, which logs and records them).
- model.kind=gbdt at privacy.epsilon=inf, gbdt.protection=rr (`rr_tree_guardrails`): the
  hessian mass of the randomised labels against gbdt.min_child_weight.
- model.kind=gbdt or scorecard at a finite privacy.epsilon (`dp_model_guardrails`): the
  training people times epsilon, the figure the accounted noise per person follows.

`before_training` is the one entry: simulations/run/config.py `check_guardrails` calls it
before the engine (a run, a sweep's cells, a tune's candidates), `fedscore data check` prints
what it says. The thresholds were measured, not guessed: bench/small_data.py, bench/RESULTS.md
"Guardrails for small data: trees and scorecard".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.config import AuthorityConfig
from server.dp_guardrails import Guardrail, Sampling, sampling_guardrails
from server.label_dp import flip_probability

# SecureBoost trees on randomised-response labels. A split must leave gbdt.min_child_weight of
# hessian on both sides, so below 2 x min_child_weight of mass at the root no tree ever splits
# (test AUC 0.5). The randomised labels' forward-corrected (Fisher) hessian is a fraction of a
# clean label's p (1 - p): at a 6 % default rate, 28 % at label epsilon 2 and 6 % at 1. Measured
# (bench/small_data.py rr, generated population, 3 seeds): every run with an expected root mass
# under 2 x min_child_weight grew only single leaves; between 2x and 3x some did (the run
# estimates the default rate from the randomised labels, so its own mass moves around the
# expected one); min_child_weight at a quarter of the mass learned in every case measured.
MIN_SPLITS_OF_MASS = 2.0
WARN_SPLITS_OF_MASS = 3.0
ADVISED_SPLITS_OF_MASS = 4.0
LARGEST_LABEL_EPSILON = 20.0  # the search for a label epsilon that would work stops here


@dataclass(frozen=True, kw_only=True)
class People:
    """What is known of the people before any engine starts: how many can be in training
    (an upper bound, from the tables), and the authority's default rate when it was read."""

    n_train: int
    positive_rate: float | None = None


def before_training(cfg: AuthorityConfig, people: People) -> list[Guardrail]:
    """Every guardrail of this configuration on these people, for any model kind."""
    privacy = cfg.privacy
    if cfg.model.kind == "mlp":
        if not privacy.dp_sgd:
            return []
        sampling = Sampling(n_train=people.n_train, batch_size=cfg.train.batch_size,
                            epochs=cfg.train.epochs)
        return sampling_guardrails(sampling, privacy.delta_for(people.n_train))
    if privacy.dp_sgd:
        return dp_model_guardrails(cfg, people.n_train)
    if needs_rate(cfg) and people.positive_rate is not None:
        return rr_tree_guardrails(people.n_train, people.positive_rate, privacy.label_epsilon,
                                  _min_child_weight(cfg))
    return []


# ---- SecureBoost trees on randomised labels ------------------------------------------------


def rr_hessian(rate: float, label_epsilon: float) -> float:
    """One training person's expected hessian at the first margin (the default rate's
    log-odds): q'^2 / (q (1 - q)), q = rho + (1 - 2 rho) p (server/gbdt_boost.py
    `rr_gradients`); p (1 - p) at label_epsilon = inf."""
    rho = flip_probability(label_epsilon)
    p = min(max(rate, 1e-6), 1 - 1e-6)
    q = rho + (1 - 2 * rho) * p
    dq = (1 - 2 * rho) * p * (1 - p)
    return dq * dq / (q * (1 - q))


def rr_root_hessian(n_train: int, rate: float, label_epsilon: float) -> float:
    """The hessian mass at every tree's root before boosting moves the margins."""
    return n_train * rr_hessian(rate, label_epsilon)


def rr_tree_guardrails(n_train: int, rate: float, label_epsilon: float,
                       min_child_weight: float) -> list[Guardrail]:
    mass = rr_root_hessian(n_train, rate, label_epsilon)
    if min_child_weight <= 0 or mass >= WARN_SPLITS_OF_MASS * min_child_weight:
        return []
    refuse = mass < MIN_SPLITS_OF_MASS * min_child_weight
    each = rr_hessian(rate, label_epsilon) / rr_hessian(rate, math.inf)
    why = ("so no split can leave that much hessian on both sides: every tree is a single "
           "leaf and the model scores everyone alike (AUC 0.5)" if refuse else
           "so few splits can leave that much hessian on both sides, and the run's own "
           "estimate of the default rate from the randomised labels may leave every tree a "
           "single leaf")
    return [Guardrail(check="tree_hessian", level="refuse" if refuse else "warn", message=(
        f"hessian mass {mass:.1f} at the root ({n_train:,} people in training, default rate "
        f"about {rate:.1%}, privacy.label_epsilon={label_epsilon:g}: a randomised label "
        f"carries {each:.0%} of a clean label's hessian) is under "
        f"{MIN_SPLITS_OF_MASS if refuse else WARN_SPLITS_OF_MASS:g} x "
        f"gbdt.min_child_weight={min_child_weight:g}, {why}; "
        f"{_rr_fix(n_train, rate, label_epsilon, min_child_weight, mass)}"))]


def _rr_fix(n_train: int, rate: float, label_epsilon: float, min_child_weight: float,
            mass: float) -> str:
    """A min_child_weight at a quarter of the mass (the cheapest fix: no privacy spent), the
    label epsilon or the people that would give ADVISED_SPLITS_OF_MASS x the current one."""
    wanted = ADVISED_SPLITS_OF_MASS * min_child_weight
    fixes = [f"use gbdt.min_child_weight={_round_down(mass / ADVISED_SPLITS_OF_MASS):g}"]
    epsilon = _label_epsilon_for(wanted, n_train, rate, label_epsilon)
    if epsilon is not None:
        fixes.append(f"privacy.label_epsilon={epsilon:g} (the silos learn more of each label)")
    fixes.append(f"about {math.ceil(wanted / rr_hessian(rate, label_epsilon)):,} people in "
                 "training")
    return ", or ".join(fixes)


def _label_epsilon_for(mass: float, n_train: int, rate: float, now: float) -> float | None:
    """The smallest label epsilon (to 0.1) whose root mass reaches `mass`, or None."""
    if rr_root_hessian(n_train, rate, LARGEST_LABEL_EPSILON) < mass:
        return None
    lo, hi = now, LARGEST_LABEL_EPSILON
    while hi - lo > 0.05:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rr_root_hessian(n_train, rate, mid) < mass else (lo, mid)
    return math.ceil(hi * 10) / 10


def _round_down(x: float) -> float:
    """Two significant figures, never above x (the advice must pass the rule)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return math.floor(x / scale) * scale


def _min_child_weight(cfg: AuthorityConfig) -> float:
    weight = cfg.gbdt.min_child_weight
    return 0.0 if weight is None else float(weight)


# ---- DP trees and DP scorecard ---------------------------------------------------------------


# The DP trees and the DP scorecard add noise of a fixed size to sums over the training
# people, so what they keep of the signal follows training people x epsilon. Measured on the
# generated population (bench/small_data.py, 20,000 held-out people, 2-3 seeds), the loss to
# the same model without noise: the DP scorecard lost about 0.10 AUC at 2,100 people x eps 1,
# 0.06 at 7,000, 0.03 at 8,400 (2,100 x eps 4), under 0.01 from 14,000; the DP trees about
# 0.17 below their large-data level at 700, 0.06 at 2,100 to 2,800, 0.02 at 7,000 to 8,400.
# Neither collapsed to AUC 0.5 (lowest 0.63), so these only warn.
PEOPLE_EPSILON: dict[str, float] = {"scorecard": 10_000.0, "gbdt": 5_000.0}
MODEL_NAMES = {"scorecard": "DP scorecard's", "gbdt": "DP trees'"}


def dp_model_guardrails(cfg: AuthorityConfig, n_train: int) -> list[Guardrail]:
    """The DP trees' and the DP scorecard's rule: training people x privacy.epsilon."""
    kind, epsilon = cfg.model.kind, cfg.privacy.epsilon
    wanted = PEOPLE_EPSILON.get(kind)
    if wanted is None or n_train * epsilon >= wanted:
        return []
    return [Guardrail(check="people_epsilon", level="warn", message=(
        f"{n_train:,} people in training x privacy.epsilon={epsilon:g} = "
        f"{n_train * epsilon:,.0f} is under {wanted:,.0f}: the {MODEL_NAMES[kind]} noise is "
        "fixed per release, so on this few people it costs several points of AUC against the "
        "same model without noise (measured: docs/real-data.md); use privacy.epsilon="
        f"{math.ceil(10 * wanted / n_train) / 10:g}, or about "
        f"{math.ceil(wanted / epsilon):,} people in training"))]


def needs_rate(cfg: AuthorityConfig) -> bool:
    """Whether `before_training` judges this configuration by the authority's default rate."""
    return (cfg.model.kind == "gbdt" and not cfg.privacy.dp_sgd and cfg.privacy.label_dp
            and cfg.gbdt.protection == "rr")
