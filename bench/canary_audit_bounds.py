"""One-run canary audit lower bounds at the default run's parameters (issue 17).

For combined epsilon inf, 8, 4, 1: calibrate the joint noise multiplier as the run does (the
statistics before training in the same accountant), noise each of K = 4 blocks at sqrt(K) times
it, and audit with 1,000 white-box canaries (simulations/canary_audit.py), three seeds each.
    .venv/bin/python bench/canary_audit_bounds.py
"""
import math
import time

import numpy as np

from clients.accounting import calibrate_sigma
from clients.dp_constants import PRIOR_NOISE_MULTIPLIER, STATISTICS_NOISE_MULTIPLIER
from simulations.canary_audit import canary_audit

n, K, C = 60_000, 4, 5.0
q = 2048 / n; T = 12 * round(1 / q); delta = 0.1 / n
prefix = [(STATISTICS_NOISE_MULTIPLIER, 1.0, 6), (PRIOR_NOISE_MULTIPLIER, 1.0, 1)]
for eps in (math.inf, 8.0, 4.0, 1.0):
    joint = calibrate_sigma(eps, delta, q, T, "prv", prefix=prefix) if math.isfinite(eps) else 0.0
    out = []
    for seed in range(3):
        t = time.perf_counter()
        r = canary_audit(noise_multiplier=joint * math.sqrt(K), blocks=K, sample_rate=q, steps=T,
                         max_grad_norm=C, delta=delta, rng=np.random.default_rng(seed))
        out.append((round(r["epsilon_lower_bound"], 3), round(time.perf_counter() - t, 1)))
    print(f"eps {eps}: joint sigma {joint:.4f}, q {q:.4f}, T {T}: lower bounds / seconds {out}", flush=True)
