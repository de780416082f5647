"""The in-process vertical WoE scorecard (simulations/run/scorecard.py) on the generated
population, non-private (plain histograms), against the oracle (the generator's true
probabilities) and the central WoE scorecard reference (simulations/analysis/references.py's
`fit_scorecard` on the joined prepared matrix), on the same 70/30 train/test split.

Every person in every silo (coverage 1), features prepared as each silo prepares them with
exact statistics (`rng=None`, the experiment layer's reference, as bench/label_dp.py does).
Wall times by time.perf_counter in one process, one BLAS thread.

    PYTHONPATH=. .venv/bin/python bench/scorecard_core.py [--users 100000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from clients.protocol.schema import ID_COLUMN, LABEL_COLUMN, SILOS, feature_names
from clients.silo.data import prepare
from crypto.identity import normalize_phones
from server.metrics import auc
from simulations.analysis.references import fit_scorecard
from simulations.data.population import PopulationConfig, generate
from simulations.run.scorecard import fit_vertical_scorecard, predict_vertical_scorecard


def population(users: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(prepared matrix per silo, labels, true probabilities), rows aligned on the authority."""
    pop = generate(PopulationConfig(users=users, seed=seed, coverage=(1.0, 1.0, 1.0)))
    ids = normalize_phones(pop.authority[ID_COLUMN]).to_numpy()
    xs = {}
    for silo in SILOS:
        m = prepare(pop.silos[silo], silo, feature_names(silo), rng=None)
        rows = pd.Index(m.ids.to_numpy()).get_indexer(ids)
        assert (rows >= 0).all(), "coverage 1: every person is in every silo"
        xs[silo] = np.ascontiguousarray(m.x[rows], dtype=np.float64)
    truth = pop.truth.set_index(ID_COLUMN).loc[pop.authority[ID_COLUMN]]
    return xs, pop.authority[LABEL_COLUMN].to_numpy(np.float64), truth["p_true"].to_numpy()


def one(xs: dict[str, np.ndarray], y: np.ndarray, p_true: np.ndarray, seed: int,
        bins: int) -> dict[str, float]:
    perm = np.random.default_rng([seed, 0x5C0]).permutation(len(y))
    cut = round(0.7 * len(y))
    train, test = np.sort(perm[:cut]), np.sort(perm[cut:])
    t0 = time.perf_counter()
    model = fit_vertical_scorecard({k: x[train] for k, x in xs.items()}, y[train], bins=bins)
    fit = time.perf_counter() - t0
    p = predict_vertical_scorecard(model, {k: x[test] for k, x in xs.items()})
    joined = np.hstack(list(xs.values()))
    t0 = time.perf_counter()
    central = fit_scorecard(joined[train], y[train])
    central_fit = time.perf_counter() - t0
    share_outside = float(np.mean(np.abs(joined[train]) > 1))
    return {"oracle": auc(y[test], p_true[test]), "vertical": auc(y[test], p),
            "central": auc(y[test], central.logits(joined[test])), "fit_s": fit,
            "central_s": central_fit, "outside": share_outside,
            "bins": sum(len(t.woe) for ts in model.tables.values() for t in ts),
            "used": sum(int(np.count_nonzero(c)) for c in model.coef.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--population-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bins", type=int, default=32)
    args = ap.parse_args()
    xs, y, p_true = population(args.users, args.population_seed)
    print(f"population {args.users:,}: {sum(x.shape[1] for x in xs.values())} inputs "
          f"({', '.join(f'{k} {x.shape[1]}' for k, x in xs.items())}), "
          f"default rate {y.mean():.4f}")
    print("| split seed | oracle AUC | vertical scorecard | central scorecard | vertical - oracle "
          "| vertical - central | bins / inputs used | fit (vertical / central) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with threadpool_limits(limits=1, user_api="blas"):
        for seed in args.seeds:
            r = one(xs, y, p_true, seed, args.bins)
            print(f"| {seed} | {r['oracle']:.4f} | {r['vertical']:.4f} | {r['central']:.4f} | "
                  f"{r['vertical'] - r['oracle']:+.4f} | {r['vertical'] - r['central']:+.4f} | "
                  f"{r['bins']} / {r['used']} | {r['fit_s']:.2f} s / {r['central_s']:.2f} s |",
                  flush=True)
    print(f"share of prepared values outside [-1, 1] (clipped into the end bins): "
          f"{r['outside']:.4f}")


if __name__ == "__main__":
    main()
