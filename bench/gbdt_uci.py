"""Closing the non-private GBDT gap on UCI (issue 20 acceptance: federated trees within 0.005
of central gradient boosting on the same split), in process.

The UCI parties and their prepared matrices as bench/gbdt_dp.py loads them (the run's import
and preparation), its per-seed 70/15/15 split from the authority's secret; the in-process
SecureBoost trees (simulations/run/gbdt.py, clean labels: what `fedscore run` at
privacy.epsilon=inf, privacy.label_epsilon=inf grows, bit for bit) against central LightGBM
(simulations/analysis/references.py, the run's central reference, early-stopped on the
validation people) on the same split. Per variant: test AUC with all trees, and with the
number of trees of the best validation log loss (the run keeps that model,
server/gbdt_run.py), with the counts chosen.

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/gbdt_uci.py --seeds 0,1,2 \\
        --variants '[{}, {"binning": "quantile"}, {"binning": "quantile", "bins": 64}]'

A variant is a dict of fit_vertical keywords (trees, depth, bins, lr, lambda_,
min_child_weight, binning) plus "scale" (uniform bins read x / scale; 4 = STANDARD_UNITS, the
run's). Select settings on seeds 0-2 and confirm on 3-5. `--generated USERS` runs the same on
the generated default population (aligned on the people every party holds).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.gbdt_dp import Uci, load, secret, summary
from clients.protocol.gbdt import STANDARD_UNITS
from clients.protocol.schema import federation_silos
from clients.silo.data import load_silo
from server.config import SplitConfig
from server.labels import load_labels
from server.metrics import auc, log_loss
from server.split import random_split
from simulations.analysis.references import Split, fit_gbdt, gbdt_logits
from simulations.data.population import PopulationConfig, generate, write_parties
from simulations.run.gbdt import fit_vertical, staged_margins


def generated(parties: Path, users: int) -> Uci:
    """The generated population (default settings) as its silos prepare it, aligned on the
    people every silo and the authority hold (what PSI would give)."""
    if not (parties / "authority").exists():
        write_parties(generate(PopulationConfig(users=users)), parties)
    ids, y = load_labels(parties / "authority")
    tables = {s: load_silo(parties / s, s) for s in federation_silos(parties)}
    common = functools.reduce(np.intersect1d, [t.ids.to_numpy() for t in tables.values()]
                              + [ids.to_numpy()])
    silos, columns = {}, {}
    for name, table in tables.items():
        rows = pd.Index(table.ids.to_numpy()).get_indexer(common)
        silos[name], columns[name] = table.x[rows].astype(np.float64), table.columns
    labels = np.asarray(y, dtype=np.float64)[pd.Index(ids.to_numpy()).get_indexer(common)]
    return Uci(silos, columns, labels)


def central(data: Uci, split: Split, seed: int) -> dict:
    """The run's central LightGBM reference on the joined prepared matrix."""
    x = np.hstack(list(data.silos.values()))
    t0 = time.perf_counter()
    model = fit_gbdt(x, data.y, split, seed)
    seconds = time.perf_counter() - t0
    return {"auc": auc(data.y[split.test], gbdt_logits(model, x[split.test])),
            "seconds": seconds, "rounds": model.best_iteration}


def trees(data: Uci, split: Split, variant: dict) -> dict:
    variant = dict(variant)
    scale = float(variant.pop("scale", STANDARD_UNITS))
    xs = {s: x / scale for s, x in data.silos.items()}
    train = {s: x[split.train] for s, x in xs.items()}
    t0 = time.perf_counter()
    model = fit_vertical(train, data.y[split.train], **variant)
    seconds = time.perf_counter() - t0
    val = staged_margins(model, {s: x[split.val] for s, x in xs.items()}, train)
    test = staged_margins(model, {s: x[split.test] for s, x in xs.items()}, train)
    losses = [log_loss(data.y[split.val], 1 / (1 + np.exp(-z))) for z in val[1:]]
    best = int(np.argmin(losses)) + 1
    y = data.y[split.test]
    return {"all": auc(y, test[-1]), "best": auc(y, test[best]), "count": best,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="[{}]", help="JSON list of fit_vertical dicts")
    parser.add_argument("--parties", type=Path, default=Path("/tmp/gbdt_uci/parties"))
    parser.add_argument("--generated", type=int, metavar="USERS",
                        help="the generated default population of USERS instead of UCI")
    parser.add_argument("--no-central", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = generated(args.parties, args.generated) if args.generated else load(args.parties)
    splits = {}
    for seed in seeds:
        drawn = random_split(data.y, SplitConfig(), secret(seed, "authority").generator("split"))
        splits[seed] = Split(drawn.train, drawn.val, drawn.test)
    print("| model | test AUC, all trees | test AUC, best-validation trees (count) "
          "| fit s |", flush=True)
    print("| --- | --- | --- | --- |", flush=True)
    if not args.no_central:
        rows = [central(data, splits[s], s) for s in seeds]
        print(f"| central LightGBM (rounds {', '.join(str(r['rounds']) for r in rows)}) "
              f"| | {summary([r['auc'] for r in rows])} "
              f"| {statistics.mean(r['seconds'] for r in rows):.1f} |", flush=True)
    for variant in json.loads(args.variants):
        rows = [trees(data, splits[s], variant) for s in seeds]
        print(f"| {json.dumps(variant)} | {summary([r['all'] for r in rows])} "
              f"| {summary([r['best'] for r in rows])} "
              f"({', '.join(str(r['count']) for r in rows)}) "
              f"| {statistics.mean(r['seconds'] for r in rows):.1f} |", flush=True)


if __name__ == "__main__":
    main()
