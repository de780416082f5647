"""Public constants of the privacy mechanisms that every party must agree on, in a module
without torch or Opacus (a silo's light handlers import it; clients/protocol/accounting.py
needs both).
"""

# The noise multiplier of every statistic a party releases outside DP-SGD (a silo's
# preparation statistics and its contribution summary, the authority's prior): Gaussian noise
# of this many times the statistic's L2 sensitivity. Composed for all of them, a few hundredths
# of epsilon, which the calibration of the training noise takes into account.
STATISTICS_NOISE_MULTIPLIER = 100.0

# The authority's prior (two counts: positives and people, sensitivity sqrt 2) gets less noise:
# it starts the bias, and at a few thousand people a multiplier of 100 would make it noise.
PRIOR_NOISE_MULTIPLIER = 20.0

# A silo's statistics release keeps a category value its schema does not list only when the
# value's noisy count passes a threshold (clients/silo/data.py), set so that a value held by one
# person passes with probability at most this over the whole release. The Gaussian accounting
# covers the noisy numbers, not which values exist, so the release is (epsilon, delta_gaussian +
# THRESHOLD_DELTA)-DP: the authority adds it to the combined model's delta, one per silo release
# (server/privacy.py reserves it out of the configured delta).
THRESHOLD_DELTA = 1e-9

# delta, unless a run sets its own: 1/(10 N) for N people the mechanism protects (DESIGN.md),
# well below 1/N, the level at which releasing one random record whole would be allowed.
DEFAULT_DELTA_PER_PERSON = 0.1


def default_delta(asked: float, people: int) -> float:
    """The delta in force: `asked` when set (non-zero), else 1/(10 N) with N = `people`."""
    return asked or DEFAULT_DELTA_PER_PERSON / people
