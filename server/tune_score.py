"""The authority's DP selection score of one tuning run: a noisy validation log-loss.

Each validation person's log-loss under the run's calibrated probability is clipped to
[0, CLIP] (probabilities held within [P_MIN, 1 - P_MIN]), so adding or removing one person
moves the sum by at most CLIP: the sum is released with Gaussian noise of standard deviation
`noise_multiplier * CLIP` from the authority's secret stream. The tuner keeps the run with the
lowest noisy mean (the sum over the run's count of scored validation people: each run of a tune
has its own training seed, hence its own split, and the counts differ by a few people; the
split's sizes are public in every run's authority.json, as for any run). The release is one
Gaussian mechanism on the validation population, recorded on the run's ledger as a
`GaussianRelease` (purpose "tune_score"), composed there after the run's calibration on the
same people.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clients.protocol.accounting import History, add_steps, epsilon
from server.ledger_lines import GaussianRelease, LedgerLine

P_MIN = 0.01
CLIP = math.log(1 / P_MIN)  # the largest log-loss a person can add to the sum
PURPOSE = "tune_score"
AUTHORITY = "authority"


@dataclass(frozen=True)
class NoisyScore:
    loss_sum: float  # noisy sum of clipped log-losses (the release)
    people: int  # validation people scored (the same for every run of a tune)
    noise_multiplier: float

    @property
    def mean_loss(self) -> float:
        """The noisy mean log-loss: a post-processing of the release."""
        return self.loss_sum / max(self.people, 1)

    @property
    def noise_std_mean(self) -> float:
        """The noise's standard deviation on the mean log-loss (how finely runs are told apart)."""
        return self.noise_multiplier * CLIP / max(self.people, 1)


def clipped_log_loss_sum(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=float), P_MIN, 1 - P_MIN)
    y = np.asarray(y, dtype=float)
    if p.shape != y.shape:
        raise ValueError("one probability per label")
    losses = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    return float(np.minimum(losses, CLIP).sum())


def noisy_score(p: np.ndarray, y: np.ndarray, rng: np.random.Generator,
                noise_multiplier: float) -> NoisyScore:
    """The release: the clipped log-loss sum plus N(0, (noise_multiplier * CLIP)^2) from `rng`
    (the authority's secret stream for this run)."""
    if not noise_multiplier > 0:
        raise ValueError("the selection score needs noise (a multiplier > 0)")
    noise = float(rng.normal(0.0, noise_multiplier * CLIP))
    return NoisyScore(clipped_log_loss_sum(p, y) + noise, len(y), noise_multiplier)


def val_history(lines: list[LedgerLine]) -> History:
    """What a run's model budget released about validation people: the lines of population
    "all" (preparation statistics) and "val" (the calibration), in ledger order."""
    history: History = []
    for line in lines:
        if (isinstance(line, GaussianRelease) and line.budget == "model"
                and line.population in ("all", "val")):
            history = add_steps(history, line.noise_multiplier, line.sample_rate, line.steps)
    return history


def score_line(lines: list[LedgerLine], noise_multiplier: float, accountant: str,
               accountant_delta: float, delta: float, round_: int) -> GaussianRelease:
    """The ledger line of the score's release, after a run's own lines `lines`: its epsilon is
    the validation population's composition with it, as the run's accountant composes."""
    history = add_steps(val_history(lines), noise_multiplier, 1.0, 1)
    return GaussianRelease(
        party=AUTHORITY, population="val", purpose=PURPOSE, noise_multiplier=noise_multiplier,
        sample_rate=1.0, steps=1, round=round_,
        epsilon=epsilon(accountant, history, accountant_delta), delta=delta,
        accountant=accountant)


def has_score(lines: list[LedgerLine]) -> bool:
    return any(isinstance(x, GaussianRelease) and x.purpose == PURPOSE for x in lines)
