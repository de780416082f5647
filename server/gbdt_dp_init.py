"""A first additive stage for the DP trees (`gbdt.init=additive`; issue 20 acceptance "at
combined eps 1 >= 0.76").

Why. The DP trees' random structure limits them (bench/RESULTS.md "DP trees: post-processing
the released leaf sums": the leaves' noise costs only about 0.002 validation AUC), while the
DP WoE scorecard (server/scorecard_dp.py) fits every column's bins at once with a few noisy
Newton steps over all of them: in effect one boosting round of all-feature stumps fitted
jointly, far cheaper in budget than per-tree releases. So the trees boost on top of that
stage's margin, as gradient boosting with a base margin does (XGBoost's `base_margin`): the
stage captures the additive signal, the random trees the interactions and what is left.

The mechanism is the two models' own, composed on one accountant:

1. the silos' preparation statistics (`prefix`),
2. the scorecard's noisy counts and `steps` noisy Newton steps over every training person
   (server/scorecard_dp.py, without subsampling, so ONE Gaussian mechanism of multiplier
   `whole / sqrt(share)`, where `whole` is the single Gaussian multiplier that would spend
   the whole budget after the prefix: the stage gets the share `share` of the budget counted
   in 1/sigma^2, the scorecard's own `count_share` convention),
3. the trees' Poisson-sampled leaf sums, calibrated so that the whole history meets the target
   (`gbdt_dp.plan_noise` with the stage in its prefix). The trees release no prior of their
   own: the stage's intercept (from its noisy counts) is their starting point.

`InitTreesRelease` is the run's release: its ledger lines are the stage's (purposes
"dp-trees init counts", "dp-trees init newton steps") then the trees', each with the epsilon of
everything up to it, so `fedscore ledger verify` recomputes the combined epsilon.

What each party learns beyond the random trees: the authority, every routed person's pre-bin
of every silo column on the scorecard's scale (one routing request per silo with its bit at
every threshold: the DP scorecard's question, server/scorecard_dp.py); the silos nothing (the
stage's tables stay with the authority; no label-dependent message reaches a silo). Reason
codes: a person's credit per (silo, column) from the stage is its coefficient times the WoE of
their pre-bin, from the released tables and coefficients only (post-processing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from clients.protocol.accounting import History, calibrate_sigma
from clients.protocol.gbdt import STANDARD_UNITS
from crypto.secret_random import SecretRandom
from server import gbdt_dp, scorecard_dp
from server.gbdt_silos import FlowerSilos
from server.ledger_lines import GaussianRelease
from server.scorecard import VerticalScorecard

log = logging.getLogger(__name__)

INITS = ("none", "additive")
COUNTS_PURPOSE = "dp-trees init counts"
STEPS_PURPOSE = "dp-trees init newton steps"
UNITS = STANDARD_UNITS  # the stage's pre-bins: the DP scorecard's scale (+-4 standard units)


@dataclass(frozen=True, kw_only=True)
class InitParams:
    """The first stage: a DP scorecard (`card`, its defaults) on `share` of the budget."""

    share: float = 0.5
    card: scorecard_dp.DpScorecardParams = field(
        default_factory=scorecard_dp.DpScorecardParams)

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise ValueError("the first stage's share of the budget must lie in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class InitTreesRelease:
    """The stage's release then the trees' (whose prefix holds the stage's history)."""

    stage: scorecard_dp.DpScorecardRelease
    trees: gbdt_dp.DpTreesRelease

    @property
    def epsilon(self) -> float:
        return self.trees.epsilon

    @property
    def noise_multiplier(self) -> float:
        return self.trees.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.trees.sample_rate

    @property
    def steps(self) -> int:
        return self.trees.steps

    @property
    def private(self) -> bool:
        return self.trees.private

    def history(self) -> History:
        return self.trees.history()

    def ledger_lines(self, round_: int = 0) -> list[GaussianRelease]:
        if not self.private:
            return []
        counts, steps = self.stage.ledger_lines(round_)
        return [replace(counts, purpose=COUNTS_PURPOSE), replace(steps, purpose=STEPS_PURPOSE),
                *self.trees.ledger_lines(round_)]


def plan_noise(params: gbdt_dp.DpTreeParams, init: InitParams, *, epsilon_: float,
               delta: float, prefix: History | Sequence[tuple[float, float, int]] = ()
               ) -> InitTreesRelease:
    """The stage at share `init.share` of the budget after `prefix`, then the trees calibrated
    to meet (epsilon_, delta) over everything (within `calibrate_sigma`'s 0.5 %)."""
    prefix_t = tuple((float(s), float(q), int(n)) for s, q, n in prefix)
    if not math.isfinite(epsilon_):
        stage = scorecard_dp.plan_noise(init.card, epsilon_=epsilon_, delta=delta,
                                        prefix=prefix_t)
        return InitTreesRelease(stage=stage, trees=gbdt_dp.plan_noise(
            params, epsilon_=epsilon_, delta=delta, prefix=prefix_t, prior=False))
    whole = calibrate_sigma(epsilon_, delta, 1.0, 1, init.card.accountant,
                            prefix=list(prefix_t))
    stage = scorecard_dp.split_noise(init.card, whole / math.sqrt(init.share),
                                     target=epsilon_, delta=delta, prefix=prefix_t)
    trees = gbdt_dp.plan_noise(params, epsilon_=epsilon_, delta=delta,
                               prefix=stage.history(), prior=False)
    log.info("dp trees' first stage: multiplier %.3f (share %.2f), epsilon %.4f before the "
             "trees", whole / math.sqrt(init.share), init.share, stage.epsilon)
    return InitTreesRelease(stage=stage, trees=trees)


def fit_stage(pre: Mapping[str, np.ndarray], y: np.ndarray, init: InitParams,
              release: InitTreesRelease, rng: SecretRandom, *, purpose: str = ""
              ) -> VerticalScorecard:
    """The stage on the training people's pre-bins `pre` (per silo, (rows, columns)); its
    noise from the authority's "dp-scorecard" streams, addressed by `purpose`."""
    return scorecard_dp.fit_from_bins(pre, y, init.card, release.stage, rng,
                                      purpose=purpose).model


def route_and_fit(silos: FlowerSilos, train: np.ndarray, y: np.ndarray, init: InitParams,
                  release: InitTreesRelease, rng: SecretRandom, *, purpose: str = ""
                  ) -> tuple[VerticalScorecard, dict[str, np.ndarray]]:
    """In a run: ONE routing request per silo for its bit at every threshold of every column
    (every routed person's pre-bins, the silos started on the stage's scale), then the stage
    on the `train` positions (y: everyone's 0/1 labels). The stage and everyone's pre-bins."""
    bins = init.card.card.bins
    widths = {name: f for name, f in silos.features.items() if f}
    replies = silos.route_all({name: scorecard_dp.thresholds_request(f, bins)
                               for name, f in widths.items()})
    pre = {name: scorecard_dp.pre_bins(replies[name], f, bins) for name, f in widths.items()}
    stage = fit_stage({name: b[train] for name, b in pre.items()}, y[train], init, release,
                      rng, purpose=purpose)
    return stage, pre


def stage_credits(model: VerticalScorecard, pre: Mapping[str, np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], float]:
    """Per silo, (rows, columns): each person's coefficient x WoE of their pre-bin per column;
    and the stage's intercept. Summed, they are `scorecard_dp.margins` exactly."""
    tables = {}
    for name, b in pre.items():
        design = scorecard_dp.design({name: b}, model.tables)[:, :-1]
        tables[name] = design * np.asarray(model.coef[name])[None, :]
    return tables, float(model.intercept)
