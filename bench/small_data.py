"""Where the tree and scorecard models stop learning on small data (issue 20 item 6), in process
on the generated population: the figures behind server/guardrails.py's rules.

Three models, each on a 70/15/15 split of `--users` people (validation AUC: the rules are
chosen on validation people, never on test people):
- `rr`: the SecureBoost trees of `fedscore run --set model.kind=gbdt --set privacy.epsilon=inf`
  (server/gbdt_boost.py `fit`, quantile bins, 50 trees of depth 5) on randomised-response
  labels at `--label-eps`, with `--mcw` values of gbdt.min_child_weight; the best validation
  log loss keeps its trees, as a run does. Printed beside it: the expected hessian mass at the
  root, n_train * h(base rate, rho), the figure server/guardrails.py judges.
- `dptrees`: the DP random trees (server/gbdt_dp.py, the run's defaults) at `--epsilon`.
- `scorecard`: the DP WoE scorecard (server/scorecard_dp.py, the run's defaults) at `--epsilon`.
Preparation with exact statistics and an empty accountant prefix (as bench/scorecard_dp.py):
a run's DP preparation statistics cost it a little more noise than here.

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/small_data.py rr --users 1000 3000 10000 \\
        --label-eps 1 2 4 inf --mcw 20 5 1
    PYTHONPATH=. nice -n 19 .venv/bin/python bench/small_data.py dptrees --users 1000 3000
    PYTHONPATH=. nice -n 19 .venv/bin/python bench/small_data.py scorecard --users 1000 3000
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from threadpoolctl import threadpool_limits

from bench.scorecard_core import population
from clients.protocol.gbdt import STANDARD_UNITS
from clients.silo.gbdt import GbdtSilo
from crypto.secret_random import SecretRandom
from server import gbdt
from server.gbdt_boost import base_margin, fit, rr_gradients
from server.gbdt_dp import DpTreeParams, plan_noise, train_dp_trees
from server.guardrails import rr_root_hessian
from server.label_dp import flip_probability, randomized_response
from server.metrics import auc, log_loss
from server.scorecard_dp import DpScorecardParams, fit_dp_scorecard, margins, route_pre_bins
from simulations.run.gbdt import _silos, staged_margins
from simulations.run.scorecard import silos_for

HOLDOUT = 20_000  # evaluation people: AUC on 150 validation people of a small run is noise


def draws(users: int, seed: int, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, evaluation) rows of a `total`-person population: a run of `users` people's
    70 % and 15 %, and HOLDOUT people none of them."""
    perm = np.random.default_rng([seed, 0x5A11, users]).permutation(total)
    held, rest = perm[:HOLDOUT], perm[HOLDOUT:]
    cut, val = round(0.7 * users), round(0.85 * users)
    return np.sort(rest[:cut]), np.sort(rest[cut:val]), np.sort(held)


def rr_trees(xs, y, train, val, held, label_eps: float, mcw: float, seed: int) -> dict:
    rho = flip_probability(label_eps)
    y_view = randomized_response(y[train].astype(np.int64), label_eps,
                                 np.random.default_rng([seed, 7])).astype(np.float64)
    tr = {s: x[train] / STANDARD_UNITS for s, x in xs.items()}
    va = {s: x[val] / STANDARD_UNITS for s, x in xs.items()}
    ev = {s: x[held] / STANDARD_UNITS for s, x in xs.items()}
    params = gbdt.GbdtParams(trees=50, depth=5, bins=32, lr=0.1, lambda_=1.0,
                             min_child_weight=mcw, binning="quantile")
    fitted = fit(_silos(tr, 32, "quantile"), y_view, rho, params)
    staged = staged_margins(fitted.model, va, tr)[1:]
    losses = [log_loss(y[val], 1 / (1 + np.exp(-z))) for z in staged]
    best = int(np.argmin(losses))
    _, h0 = rr_gradients(np.full(len(train), base_margin(y_view, rho)), y_view, rho)
    scored = staged_margins(fitted.model, ev, tr)[best + 1]
    return {"auc": auc(y[held], scored), "kept": best + 1,
            "split_trees": sum(1 for t in fitted.model.trees if t.splits),
            "root_h": float(h0.sum()),
            "rule_h": rr_root_hessian(len(train), float(y[train].mean()), label_eps)}


def dp_trees(xs, y, train, val, held, eps: float, seed: int) -> dict:
    params = DpTreeParams()
    delta = 1 / (10 * len(train))
    release = plan_noise(params, epsilon_=eps, delta=delta)
    silos = {s: GbdtSilo(s, x[train], bins=params.bins) for s, x in xs.items()}
    fitted = train_dp_trees(silos, y[train], params, release,
                            SecretRandom(bytes([seed + 1]) * 32), purpose=f"small{seed}")
    scored = {s: GbdtSilo(s, x[held], bins=params.bins) for s, x in xs.items()}
    return {"auc": auc(y[held], gbdt.predict_trees(fitted.model, scored, len(held))),
            "sigma": release.noise_multiplier}


def scorecard(xs, y, train, val, held, eps: float, seed: int) -> dict:
    params = DpScorecardParams()
    xs = {s: x / STANDARD_UNITS for s, x in xs.items()}
    fitted = fit_dp_scorecard(silos_for({s: x[train] for s, x in xs.items()}, 32), y[train],
                              params, epsilon=eps, delta=1 / (10 * len(train)),
                              rng=SecretRandom(bytes([seed + 1]) * 32), purpose=f"small{seed}")
    bins = route_pre_bins(silos_for({s: x[held] for s, x in xs.items()}, 32), 32)
    return {"auc": auc(y[held], margins(fitted.model, bins))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=("rr", "dptrees", "scorecard"))
    ap.add_argument("--users", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--label-eps", type=float, nargs="+", default=[2.0])
    ap.add_argument("--mcw", type=float, nargs="+", default=[20.0])
    ap.add_argument("--epsilon", type=float, nargs="+", default=[1.0])
    args = ap.parse_args()
    with threadpool_limits(limits=1, user_api="blas"):
        for seed in args.seeds:
            xs, y, _ = population(HOLDOUT + max(args.users), seed)
            for users in args.users:
                train, val, held = draws(users, seed, len(y))
                runs: list[tuple[str, dict]] = []
                t0 = time.perf_counter()
                if args.model == "rr":
                    for le in args.label_eps:
                        for mcw in args.mcw:
                            runs.append((f"label_eps={le:g} mcw={mcw:g}",
                                         rr_trees(xs, y, train, val, held, le, mcw, seed)))
                else:
                    f = dp_trees if args.model == "dptrees" else scorecard
                    for eps in args.epsilon:
                        runs.append((f"eps={eps:g}", f(xs, y, train, val, held, eps, seed)))
                took = time.perf_counter() - t0
                for name, out in runs:
                    figures = " ".join(f"{k}={v:.4f}" if isinstance(v, float) and
                                       not math.isinf(v) else f"{k}={v}"
                                       for k, v in out.items())
                    print(f"{args.model} users={users} n_train={len(train)} "
                          f"rate={y[train].mean():.3f} seed={seed} {name} {figures}", flush=True)
                print(f"  ({took:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
