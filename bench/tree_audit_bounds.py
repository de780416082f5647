"""One-run canary audit lower bounds of the DP trees' own releases (simulations/analysis/
tree_audit.py) at the default DP tree parameters, UCI-sized and default-population-sized.

Per size (N_train: UCI 21,100, the default population 59,881, as bench/RESULTS.md's "DP
vertical trees in fedscore run" measured them) and combined epsilon (inf, 8, 1), the noise is
planned as a run plans it: the silos' preparation statistics (with their thresholds' delta
reserved) before the model on one PRV accountant at delta 1/(10 N_train)
(server/gbdt_dp.py `plan_noise`, or server/gbdt_dp_init.py's for `gbdt.init=additive`). Each
mechanism is audited with 5,000 canaries (the run's default, tree_audit.CANARIES) over three
seeds; the audit's seconds include the accountant's epsilon of the audited releases alone
(cached after the first seed). The last rows of each size audit the default leaves at epsilon
1 with 1,000, 5,000 and 10,000 canaries, honest and broken on purpose (`--bugs`: G noised at
H's bound 1/4, a quarter of G's noise; or half the noise on G and H).

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/tree_audit_bounds.py
    PYTHONPATH=. nice -n 19 .venv/bin/python bench/tree_audit_bounds.py --epsilons '' \\
        --broken-canaries 5000 --bugs "half the noise"
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from clients.protocol.dp_constants import default_delta
from server import gbdt_dp, gbdt_dp_init
from server.delta_budget import releases_outside_sgd, split_delta
from simulations.analysis.tree_audit import CANARIES, TreeMechanism, from_release, tree_audit

# (name, N_train, silos, prepared columns). The columns only set how many cells the
# histograms and counts have per canary; the whitened statistic does not depend on them.
SIZES = [("UCI", 21_100, ("payments", "consumption", "profile"), 30),
         ("population", 59_881, ("bank", "telco", "payments"), 24)]
MECHANISMS = {
    "default": (gbdt_dp.DpTreeParams(), None),
    # guide_every 50 (6 releases at multiplier 10) alone spends more than epsilon 1 at the
    # population's delta; 100 (3 releases) fits both sizes.
    "guided": (gbdt_dp.DpTreeParams(guide_every=100), None),
    "additive": (gbdt_dp.DpTreeParams(), gbdt_dp_init.InitParams()),
}
SEEDS = (0, 1, 2)


def mechanism(kind: str, n: int, silos: tuple[str, ...], columns: int, eps: float
              ) -> tuple[TreeMechanism, float, float]:
    """The audited mechanism, the whole release's accounted epsilon, planning seconds."""
    params, init = MECHANISMS[kind]
    before = [r for r in releases_outside_sgd(silos, summaries=False) if r.purpose != "prior"]
    deltas = split_delta(default_delta(0.0, n), before)
    prefix = [(r.noise_multiplier, 1.0, 1) for r in before] if math.isfinite(eps) else []
    t0 = time.perf_counter()
    release = (gbdt_dp.plan_noise(params, epsilon_=eps, delta=deltas.accountant, prefix=prefix)
               if init is None else
               gbdt_dp_init.plan_noise(params, init, epsilon_=eps, delta=deltas.accountant,
                                       prefix=prefix))
    return from_release(params, release, columns), release.epsilon, time.perf_counter() - t0


def audit_row(label: str, mech: TreeMechanism, accounted: float, delta: float,
              canaries: int = CANARIES) -> None:
    bounds, seconds, audited = [], [], None
    for seed in SEEDS:
        result = tree_audit(mech, delta=delta, rng=np.random.default_rng(seed),
                            canaries=canaries)
        bounds.append(result["epsilon_lower_bound"])
        seconds.append(result["seconds"])
        audited = result["audited_accounted_epsilon"]
    print(f"| {label} | {accounted:.4g} | {audited if audited is None else round(audited, 3)} "
          f"| {', '.join(f'{b:.2f}' for b in bounds)} | {max(bounds):.2f} "
          f"| {', '.join(f'{s:.1f}' for s in seconds)} |", flush=True)


# Bugs in server/gbdt_dp.py `noisy_sums`, by the (G_BOUND, H_BOUND) it would noise at: the typo
# `gradient_noise_multiplier * H_BOUND` (a quarter of G's noise), and half the noise on both.
BUGS = {"G noised at H's bound": (0.25, 0.25), "half the noise": (0.5, 0.125)}


def broken_rows(name: str, mech: TreeMechanism, accounted: float, delta: float,
                counts: list[int], bugs: list[str]) -> None:
    """Honest and broken leaves at epsilon 1, per number of canaries."""
    for m in counts:
        audit_row(f"{name}, default, 1, honest, {m} canaries", mech, accounted, delta, m)
        honest = gbdt_dp.G_BOUND, gbdt_dp.H_BOUND
        for bug in bugs:
            gbdt_dp.G_BOUND, gbdt_dp.H_BOUND = BUGS[bug]
            try:
                audit_row(f"{name}, default, 1, BROKEN: {bug}, {m} canaries", mech,
                          accounted, delta, m)
            finally:
                gbdt_dp.G_BOUND, gbdt_dp.H_BOUND = honest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    parser.add_argument("--epsilons", default="inf,8,1")
    parser.add_argument("--broken-canaries", default="1000,5000,10000",
                        help="canary counts of the honest/broken rows ('' for none)")
    parser.add_argument("--bugs", default="G noised at H's bound", help=", ".join(BUGS))
    args = parser.parse_args()
    print("| size, mechanism, eps | accounted eps (whole release) | accounted eps (audited "
          "releases) | lower bound, seeds 0-2 | max | audit s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, n, silos, columns in SIZES:
        delta = default_delta(0.0, n)
        for kind in args.mechanisms.split(","):
            for eps in (float(e) for e in args.epsilons.split(",") if e):
                mech, accounted, planned = mechanism(kind, n, silos, columns, eps)
                audit_row(f"{name}, {kind}, {eps:g} (planned in {planned:.0f} s)", mech,
                          accounted, delta)
        if args.broken_canaries:
            mech, accounted, _ = mechanism("default", n, silos, columns, 1.0)
            broken_rows(name, mech, accounted, delta,
                        [int(m) for m in args.broken_canaries.split(",")],
                        args.bugs.split(","))

if __name__ == "__main__":
    main()
