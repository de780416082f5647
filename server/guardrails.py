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
before the engine (a run, a sweep's cells, a tune's candidates) to refuse, the authority
(server/run_plan.py `run_guardrails`) on its exact training people to log and record what it
says (authority.json and metrics.json `guardrails`, as the MLP's), `fedscore data check`
prints it. No message a run logs or records carries a statistic of the labels: the trees'
rule on randomised labels keeps its figures in `Guardrail.detail`, for the operator's console.
The thresholds were measured, not guessed: bench/small_data.py, bench/RESULTS.md
"Guardrails for small data: trees and scorecard".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from crypto.at_rest import Keystore
from server.config import AuthorityConfig
from server.dp_guardrails import Guardrail, Sampling, sampling_guardrails
from server.label_dp import flip_probability
from server.labels import load_labels

# SecureBoost trees on randomised-response labels. A split must leave gbdt.min_child_weight of
# hessian on both sides, so below 2 x min_child_weight of mass at the root no tree ever splits
# (AUC 0.5). The randomised labels' forward-corrected (Fisher) hessian is a fraction of a clean
# label's p (1 - p): at a 6.5 % default rate, 25 % at label epsilon 2 and 6 % at 1. And the run
# takes its first margin from the default rate it estimates from the randomised labels, whose
# standard error is sqrt(q (1 - q) / n) / (1 - 2 rho): a low estimate lowers every hessian. So:
# refused when the expected mass is under 2 x min_child_weight, warned when the mass at a rate
# LOW_ESTIMATE standard errors below is. Measured (bench/small_data.py rr, generated people,
# 1,000 to 10,000 people, label eps 1 and 2, min_child_weight 20, 5, 2, 3 seeds, AUC on 20,000
# held-out people; 54 runs): all 26 refused runs grew single leaves only (AUC 0.5), all 18 runs
# without a guardrail learned (0.74 to 0.84), 2 of the 10 warned runs grew single leaves. An
# earlier grid (2 seeds, min_child_weight 10 too, 64 runs) agreed: 27 refused all 0.5, 20
# unguarded all learned, 5 of 17 warned at 0.5.
MIN_SPLITS_OF_MASS = 2.0
LOW_ESTIMATE = 2.0
# The advice: min_child_weight at a quarter of the expected mass (and half the low one).
ADVISED_SPLITS_OF_MASS = 4.0
LARGEST_LABEL_EPSILON = 20.0  # the search for a label epsilon that would work stops here
SMALLEST_ADVISED_WEIGHT = 0.1  # below this, min_child_weight stops guarding against noise


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


def low_rate(n_train: int, rate: float, label_epsilon: float) -> float:
    """The default rate LOW_ESTIMATE standard errors under `rate`, as the run may estimate it
    from n_train randomised labels (server/gbdt_boost.py `base_margin`); never below 0."""
    rho = flip_probability(label_epsilon)
    q = rho + (1 - 2 * rho) * rate
    se = math.sqrt(q * (1 - q) / max(n_train, 1)) / (1 - 2 * rho)
    return max(rate - LOW_ESTIMATE * se, 0.0)


def _masses(n_train: int, rate: float, label_epsilon: float) -> tuple[float, float]:
    """(expected root mass, root mass at the low estimate of the rate)."""
    low = low_rate(n_train, rate, label_epsilon)
    return (rr_root_hessian(n_train, rate, label_epsilon),
            rr_root_hessian(n_train, low, label_epsilon) if low > 0 else 0.0)


def _splits(n_train: int, rate: float, label_epsilon: float, min_child_weight: float) -> bool:
    """Whether no guardrail would stand, with ADVISED_SPLITS_OF_MASS x of expected mass."""
    mass, low = _masses(n_train, rate, label_epsilon)
    return (mass >= ADVISED_SPLITS_OF_MASS * min_child_weight
            and low >= MIN_SPLITS_OF_MASS * min_child_weight)


def rr_tree_guardrails(n_train: int, rate: float, label_epsilon: float,
                       min_child_weight: float) -> list[Guardrail]:
    """The rule on randomised labels. Its figures (the rate, the hessian mass and what would
    pass) follow the authority's default rate: they go to `detail`, the operator's console
    only; `message`, which the run logs and records, names the rule, the public settings and
    which way to move them. (The verdict itself, refuse, warn or nothing, is one coarse
    function of the rate; a refused run writes nothing.)"""
    mass, low = _masses(n_train, rate, label_epsilon)
    floor = MIN_SPLITS_OF_MASS * min_child_weight
    if min_child_weight <= 0 or low >= floor:
        return []
    refuse = mass < floor
    each = rr_hessian(rate, label_epsilon) / rr_hessian(rate, math.inf)
    why = ("so no split can leave that much hessian on both sides: every tree is a single "
           "leaf and the model scores everyone alike (AUC 0.5)" if refuse else
           f"and the run estimates the default rate from the randomised labels: at "
           f"{low_rate(n_train, rate, label_epsilon):.1%} ({LOW_ESTIMATE:g} standard errors "
           f"low) the mass would be {low:.1f}, under 2 x gbdt.min_child_weight="
           f"{min_child_weight:g}, and every tree a single leaf (AUC 0.5)")
    figure = (f"under 2 x gbdt.min_child_weight={min_child_weight:g}, " if refuse else
              f"close to 2 x gbdt.min_child_weight={min_child_weight:g}, ")
    detail = (
        f"hessian mass {mass:.1f} at the root ({n_train:,} people in training, default rate "
        f"about {rate:.1%}, privacy.label_epsilon={label_epsilon:g}: a randomised label "
        f"carries {each:.0%} of a clean label's hessian) is {figure}{why}; "
        f"{_rr_fix(n_train, rate, label_epsilon, min_child_weight, mass, low)}")
    said = ("is under 2 x gbdt.min_child_weight={w:g}: no split can leave that much on both "
            "sides, every tree is a single leaf and the model scores everyone alike (AUC 0.5)"
            if refuse else
            "is close to 2 x gbdt.min_child_weight={w:g}: a default rate the run estimates "
            "low from the randomised labels would leave every tree a single leaf (AUC 0.5)")
    message = (
        f"hessian mass at the root ({n_train:,} people in training, privacy.label_epsilon="
        f"{label_epsilon:g}, at the authority's default rate) {said.format(w=min_child_weight)}"
        "; lower gbdt.min_child_weight, raise privacy.label_epsilon or train on more people "
        "(the values that pass follow the default rate, a statistic of the labels a run does "
        "not record: `fedscore data check` prints them on the authority's console)")
    return [Guardrail(check="tree_hessian", level="refuse" if refuse else "warn",
                      message=message, detail=detail)]


def _rr_fix(n_train: int, rate: float, label_epsilon: float, min_child_weight: float,
            mass: float, low: float) -> str:
    """What passes the rule with room: min_child_weight at a quarter of the expected mass
    (and half the low one; the cheapest fix, no privacy spent) when that is not tiny, the
    smallest label epsilon (to 0.1) or number of people (to 1 %) that gives `_splits`."""
    fixes = []
    weight = _round_down(min(mass / ADVISED_SPLITS_OF_MASS, low / MIN_SPLITS_OF_MASS))
    if weight >= SMALLEST_ADVISED_WEIGHT:
        fixes.append(f"use gbdt.min_child_weight={weight:g}")
    epsilon = _smallest(lambda e: _splits(n_train, rate, e, min_child_weight),
                        label_epsilon, LARGEST_LABEL_EPSILON, 0.05)
    if epsilon is not None:
        fixes.append(f"privacy.label_epsilon={math.ceil(epsilon * 10) / 10:g} (the silos learn "
                     "more of each label)")
    people = _smallest(lambda n: _splits(math.ceil(n), rate, label_epsilon, min_child_weight),
                       n_train, n_train * 10_000.0, 0.005 * n_train)
    if people is not None:
        fixes.append(f"about {_round_up(people):,} people in training")
    if not fixes:
        return "train on more people, or another model (model.kind=mlp or scorecard)"
    return ("use " if not fixes[0].startswith("use ") else "") + ", or ".join(fixes)


def _smallest(passes, lo: float, hi: float, tolerance: float) -> float | None:
    """The smallest x in [lo, hi] (within tolerance, rounded up) with passes(x), assuming it
    is monotone; None when even hi fails."""
    if not passes(hi):
        return None
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if not passes(mid) else (lo, mid)
    return hi


def _round_up(x: float) -> int:
    """Two significant figures, never below x (the advice must pass the rule)."""
    scale = 10 ** max(math.floor(math.log10(max(x, 1))) - 1, 0)
    return int(math.ceil(x / scale) * scale)


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
# the same model without noise: the DP scorecard lost 0.10 AUC at 2,100 people x eps 1, 0.06 at
# 7,000, 0.03 at 8,400 (2,100 x eps 4) and at 10,500, 0.014 at 14,000, 0.003 at 21,000; the DP
# trees about 0.17 below their large-data level at 700, 0.06 at 2,100 to 2,800, 0.02 at 7,000
# to 8,400.
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


def default_rate(authority_dir: Path, store: Keystore | None = None) -> float:
    """The authority's default rate over its own table (the trees' rule on randomised labels
    weighs their hessian by it): the authority's figure, never sent to a silo."""
    _, labels = load_labels(authority_dir, store)
    return float(labels.mean()) if len(labels) else 0.0


def needs_rate(cfg: AuthorityConfig) -> bool:
    """Whether `before_training` judges this configuration by the authority's default rate."""
    return (cfg.model.kind == "gbdt" and not cfg.privacy.dp_sgd and cfg.privacy.label_dp
            and cfg.gbdt.protection == "rr")
