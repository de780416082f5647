"""One-run canary audit lower bounds at the default run's parameters (issue 17).

For combined epsilon inf, 8, 4, 1: calibrate the joint noise multiplier as the run does (the
statistics before training in the same accountant), noise each of K = 4 blocks at sqrt(K) times
it, and audit with 1,000 white-box canaries (simulations/analysis/canary_audit.py), three
seeds each.

    .venv/bin/python bench/canary_audit_bounds.py
"""

from __future__ import annotations

import math
import time

import numpy as np

from clients.protocol.accounting import calibrate_sigma
from clients.protocol.dp_constants import PRIOR_NOISE_MULTIPLIER, STATISTICS_NOISE_MULTIPLIER
from simulations.analysis.canary_audit import canary_audit

N_TRAIN, BLOCKS, CLIP = 60_000, 4, 5.0
SAMPLE_RATE = 2048 / N_TRAIN
STEPS = 12 * round(1 / SAMPLE_RATE)
DELTA = 0.1 / N_TRAIN
# Six preparation and summary releases of the silos, and the authority's prior.
PREFIX = [(STATISTICS_NOISE_MULTIPLIER, 1.0, 6), (PRIOR_NOISE_MULTIPLIER, 1.0, 1)]


def main() -> None:
    for eps in (math.inf, 8.0, 4.0, 1.0):
        joint = (calibrate_sigma(eps, DELTA, SAMPLE_RATE, STEPS, "prv", prefix=PREFIX)
                 if math.isfinite(eps) else 0.0)
        bounds = []
        for seed in range(3):
            t0 = time.perf_counter()
            result = canary_audit(noise_multiplier=joint * math.sqrt(BLOCKS), blocks=BLOCKS,
                                  sample_rate=SAMPLE_RATE, steps=STEPS, max_grad_norm=CLIP,
                                  delta=DELTA, rng=np.random.default_rng(seed))
            bounds.append((round(result["epsilon_lower_bound"], 3),
                           round(time.perf_counter() - t0, 1)))
        print(f"eps {eps}: joint sigma {joint:.4f}, q {SAMPLE_RATE:.4f}, T {STEPS}: "
              f"lower bounds / seconds {bounds}", flush=True)


if __name__ == "__main__":
    main()
