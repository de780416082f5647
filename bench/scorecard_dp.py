"""The DP vertical WoE scorecard (server/scorecard_dp.py) in process on the generated population
at a combined epsilon, against the oracle and the non-private vertical scorecard, on the same
70/30 split; the silos are `ScorecardSilo`s answering the routing request by method calls.
Preparation with exact statistics (as bench/scorecard_core.py), so the accountant's prefix is
empty here: the run's prefix (the silos' DP statistics) costs a little more noise.

    PYTHONPATH=. .venv/bin/python bench/scorecard_dp.py [--users 100000] [--seeds 0 1 2] \
        [--epsilon 1] [--steps 6] [--count-share 0.3] [--clip 1.5] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np
from threadpoolctl import threadpool_limits

from bench.scorecard_core import population
from clients.protocol.gbdt import STANDARD_UNITS
from crypto.secret_random import SecretRandom
from server.metrics import auc
from server.scorecard_dp import DpScorecardParams, fit_dp_scorecard, margins, route_pre_bins
from simulations.run.scorecard import fit_vertical_scorecard, predict_vertical_scorecard, silos_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--steps", type=int, nargs="+", default=[6])
    ap.add_argument("--count-share", type=float, nargs="+", default=[0.3])
    ap.add_argument("--clip", type=float, nargs="+", default=[1.5])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    xs, y, p_true = population(args.users, 0)
    xs = {s: x / STANDARD_UNITS for s, x in xs.items()}
    delta = 1 / (10 * 0.7 * len(y))
    print("| seed | steps | count share | clip | oracle | non-private | DP (repeats) "
          "| DP mean - oracle |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with threadpool_limits(limits=1, user_api="blas"):
        for seed in args.seeds:
            perm = np.random.default_rng([seed, 0x5C0]).permutation(len(y))
            cut = round(0.7 * len(y))
            train, test = np.sort(perm[:cut]), np.sort(perm[cut:])
            plain = fit_vertical_scorecard({k: x[train] for k, x in xs.items()}, y[train])
            p = predict_vertical_scorecard(plain, {k: x[test] for k, x in xs.items()})
            oracle, clean = auc(y[test], p_true[test]), auc(y[test], p)
            test_bins = route_pre_bins(silos_for({k: x[test] for k, x in xs.items()}, 32), 32)
            train_silos = silos_for({k: x[train] for k, x in xs.items()}, 32)
            for steps in args.steps:
                for share in args.count_share:
                    for clip in args.clip:
                        params = DpScorecardParams(steps=steps, count_share=share, clip=clip)
                        got = []
                        for r in range(args.repeats):
                            fit = fit_dp_scorecard(train_silos, y[train], params,
                                                   epsilon=args.epsilon, delta=delta,
                                                   rng=SecretRandom(bytes([r + 1]) * 32),
                                                   purpose=f"b{seed}")
                            got.append(auc(y[test], margins(fit.model, test_bins)))
                        print(f"| {seed} | {steps} | {share} | {clip} | {oracle:.4f} | "
                              f"{clean:.4f} | {' '.join(f'{a:.4f}' for a in got)} | "
                              f"{np.mean(got) - oracle:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
