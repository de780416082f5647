"""DP vertical trees on UCI (issue 20 item 1's DP mode; server/gbdt_dp.py), in process.

The UCI table is imported as `fedscore run --data uci` imports it (three silos, the shared
data README's split of columns) and each silo prepares its matrix as in a run (`load_silo`:
noisy preparation statistics from the silo's secret). Per seed, the authority's secret draws
the run's 70/15/15 split (`server.split.random_split`); the DP trees train on the training
people at combined eps_model (the silos' preparation statistics, the prior and the trees, one
PRV accountant) with the project's delta: the default 1/(10 N_train), of which the silos'
category thresholds' share is reserved as a run reserves it (`server.privacy.split_delta`).
Beside them: the same random trees without noise (eps inf), and central LightGBM on the same
split and prepared features (`central_gbdt`, simulations/analysis/references.py: early
stopping on the validation people). Test AUC on the test people.

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/gbdt_dp.py
    PYTHONPATH=. nice -n 19 .venv/bin/python bench/gbdt_dp.py --epsilons 1 \\
        --variants '[{}, {"sample_rate": 1.0}, {"lambda_": 50}]'

`--on val` scores the validation people instead of the test people: settings are chosen there
(bench/RESULTS.md "DP trees, chosen without UCI's test people"), the test people only confirm.

A variant is a dict of DpTreeParams overrides (keys of server/gbdt_dp.DpTreeParams, plus
"weights": "uniform" (default) or "no-missing", which never draws the silos' `__missing`
indicator columns, a choice from the column names alone; "source_power": each source column
(a numeric column with its indicator, or a one-hot column's levels) weighs k^power over its k
inputs (bench/gbdt_dp_sources.py source_weights; 1: uniform, 0: every source alike);
"scale": the silos bin their prepared matrix divided by it, 1 by default as the DP trees in
`fedscore run`, DP_UNITS). Each row prints as it finishes; the bench's secrets are fixed per
seed, so the table reproduces (a party keeps its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from bench import gbdt_dp_sources
from clients.protocol.dp_constants import default_delta
from clients.silo.data import load_silo
from clients.silo.gbdt import GbdtSilo
from crypto.secret_random import SecretRandom
from server import gbdt_dp_init, scorecard_dp
from server.config import SplitConfig
from server.gbdt import predict_trees
from server.gbdt_dp import (
    PURPOSE,
    DpTreeParams,
    DpTreesRelease,
    boost,
    draw_structure,
    plan_noise,
    route_all,
)
from server.gbdt_dp_guide import train as train_dp_trees
from server.labels import load_labels
from server.metrics import auc
from server.privacy import releases_outside_sgd, split_delta
from server.split import random_split
from simulations.analysis.references import Split, fit_gbdt, gbdt_logits
from simulations.data.real_data import import_parties, uci_default_path, uci_mapping

SILOS = ("payments", "consumption", "profile")


@dataclasses.dataclass
class Uci:
    silos: dict[str, np.ndarray]
    columns: dict[str, list[str]]
    y: np.ndarray


def load(parties: Path) -> Uci:
    import_parties(uci_mapping(uci_default_path()), parties)
    ids, y = load_labels(parties / "authority")
    silos, columns = {}, {}
    for name in SILOS:
        matrix = load_silo(parties / name, name)
        if not (matrix.ids.to_numpy() == ids.to_numpy()).all():
            raise SystemExit("the UCI parties are not in one row order")  # PSI not needed
        silos[name], columns[name] = matrix.x.astype(np.float64), matrix.columns
    return Uci(silos, columns, y.astype(np.float64))


def weights(data: Uci, kind: str, power: float | None = None
            ) -> dict[str, list[float]] | None:
    """Per silo, each column's draw weight: None (uniform), "no-missing" (never a `__missing`
    indicator), and with `power` per source column (bench/gbdt_dp_sources.py)."""
    if kind not in ("uniform", "no-missing"):
        raise SystemExit(f"unknown weights {kind!r}")
    if power is None and kind == "uniform":
        return None
    out = {}
    for s, cols in data.columns.items():
        w = (np.ones(len(cols)) if power is None else
             gbdt_dp_sources.source_weights(gbdt_dp_sources.source_index(cols), power))
        if kind == "no-missing":
            w = np.where([c.endswith("__missing") for c in cols], 0.0, w)
        out[s] = [float(v) for v in w]
    return out


def secret(seed: int, party: str) -> SecretRandom:
    return SecretRandom(hashlib.sha256(f"bench-gbdt-dp/{seed}/{party}".encode()).digest())


_PLANS: dict[tuple, DpTreesRelease | gbdt_dp_init.InitTreesRelease] = {}


def planned(params: DpTreeParams, eps: float, delta: float, prefix: tuple,
            init: gbdt_dp_init.InitParams | None = None
            ) -> DpTreesRelease | gbdt_dp_init.InitTreesRelease:
    """plan_noise, once per mechanism (the seeds share N_train, hence delta and the noise)."""
    key = (params.trees, params.sample_rate, params.hessian_noise, params.accountant, eps,
           delta, prefix, params.guides, params.guide_sigma, init)
    if key not in _PLANS:
        _PLANS[key] = (plan_noise(params, epsilon_=eps, delta=delta, prefix=prefix)
                       if init is None else
                       gbdt_dp_init.plan_noise(params, init, epsilon_=eps, delta=delta,
                                               prefix=prefix))
    return _PLANS[key]


# Per (seed, structure settings, scale, scored people): the routed structure's leaves of the
# training and scored people and their pre-bins. The structure is drawn from the seed's
# secret alone, so the stage's variants share one routing (the bench's time is the routing).
_ROUTED: dict[tuple, tuple] = {}


def routed_once(data: Uci, split: Split, seed: int, params: DpTreeParams, scale: float,
                people: np.ndarray, bins: int) -> tuple:
    key = (seed, params.trees, params.depth, params.bins, scale, len(people), int(people[0]))
    if key not in _ROUTED:
        structure = draw_structure(
            {s: GbdtSilo(s, x[split.train[:2]] / scale, bins=params.bins)
             for s, x in data.silos.items()},
            params, secret(seed, "authority").generator(PURPOSE, "", "structure"))
        leaves, pre = [], []
        for rows in (split.train, people):
            silos = {s: GbdtSilo(s, x[rows] / scale, bins=params.bins)
                     for s, x in data.silos.items()}
            leaves.append(route_all(silos, structure, len(rows), params.depth).astype(np.uint8))
            pre.append(scorecard_dp.route_pre_bins(
                {s: GbdtSilo(s, x[rows] / gbdt_dp_init.UNITS, bins=bins)
                 for s, x in data.silos.items()}, bins))
        _ROUTED[key] = (structure, *leaves, *pre)
    return _ROUTED[key]


def staged(data: Uci, split: Split, seed: int, params: DpTreeParams, scale: float,
           people: np.ndarray, init: gbdt_dp_init.InitParams,
           release: gbdt_dp_init.InitTreesRelease) -> tuple[np.ndarray, np.ndarray]:
    """The first additive stage (server/gbdt_dp_init.py) and the random trees on its margin,
    fitted on the training people (the same draws as `gbdt_dp.train_dp_trees`); the scored
    people's margins: the stage's alone, and the whole model's."""
    structure, leaf, leaf_scored, pre, pre_scored = routed_once(
        data, split, seed, params, scale, people, init.card.card.bins)
    y = data.y[split.train]
    model = gbdt_dp_init.fit_stage(pre, y, init, release, secret(seed, "authority"))
    first = scorecard_dp.margins(model, pre_scored)
    trees = boost(leaf.astype(np.int64), y, structure, params, release.trees,
                  secret(seed, "authority"), init=scorecard_dp.margins(model, pre))
    offset = 2**params.depth - 1
    margin = first.copy()
    for t, tree in enumerate(trees.model.trees):
        values = np.array([tree.leaves[offset + i] for i in range(2**params.depth)])
        margin += values[leaf_scored[t]]
    return first, margin


def dp_trees(data: Uci, split: Split, seed: int, eps: float, variant: dict,
             on: str = "test") -> dict:
    variant = dict(variant)
    kind = variant.pop("weights", "uniform")
    power = variant.pop("source_power", None)
    # "scale": the silos bin x / scale. `fedscore run` bins x for the DP trees (DP_UNITS) and
    # x / 4 for the SecureBoost trees (STANDARD_UNITS).
    scale = float(variant.pop("scale", 1.0))
    # "init_share": the first additive stage (gbdt.init=additive) on that share of the budget.
    share = variant.pop("init_share", None)
    init = None if share is None else gbdt_dp_init.InitParams(share=float(share))
    params = DpTreeParams(**variant)
    n = len(split.train)
    # The silos' preparation statistics (each with its category thresholds' delta) come
    # before the trees on the same people; the prior is the trees' own (server/gbdt_dp.py).
    before = [r for r in releases_outside_sgd(SILOS, summaries=False) if r.purpose != "prior"]
    deltas = split_delta(default_delta(0.0, n), before)
    prefix = [(r.noise_multiplier, 1.0, 1) for r in before]
    train = {s: GbdtSilo(s, x[split.train] / scale, bins=params.bins)
             for s, x in data.silos.items()}
    t0 = time.perf_counter()
    release = planned(params, eps, deltas.accountant, tuple(prefix) if math.isfinite(eps) else (),
                      init)
    t1 = time.perf_counter()
    # --on val scores the validation people: settings are chosen there, never on test.
    people = split.val if on == "val" else split.test
    stage_auc = math.nan
    if init is not None:  # uniform weights only, as `fedscore run`
        assert isinstance(release, gbdt_dp_init.InitTreesRelease)
        assert kind == "uniform"
        first, margin = staged(data, split, seed, params, scale, people, init, release)
        stage_auc = auc(data.y[people], first)
        t2 = time.perf_counter()
    else:
        assert isinstance(release, DpTreesRelease)
        fitted = train_dp_trees(train, data.y[split.train], params, release,
                                secret(seed, "authority"), weights=weights(data, kind, power))
        t2 = time.perf_counter()
        scored = {s: GbdtSilo(s, x[people] / scale, bins=params.bins)
                  for s, x in data.silos.items()}
        margin = predict_trees(fitted.model, scored, len(people))
    return {"auc": auc(data.y[people], margin), "stage_auc": stage_auc,
            "calibrate": t1 - t0, "seconds": t2 - t1,
            "epsilon": release.epsilon, "delta": deltas.combined,
            "sigma": release.noise_multiplier, "n_train": n}


def central(data: Uci, split: Split, seed: int, on: str = "test") -> dict:
    x = np.hstack([data.silos[s] for s in SILOS])
    t0 = time.perf_counter()
    model = fit_gbdt(x, data.y, split, seed)
    seconds = time.perf_counter() - t0
    people = split.val if on == "val" else split.test
    return {"auc": auc(data.y[people], gbdt_logits(model, x[people])),
            "seconds": seconds, "rounds": model.best_iteration}


def summary(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({', '.join(f'{v:.4f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epsilons", default="1,inf")
    parser.add_argument("--variants", default="[{}]", help="JSON list of DpTreeParams dicts")
    parser.add_argument("--parties", type=Path, default=Path("/tmp/gbdt_dp/parties"),
                        help="where the UCI parties are imported (reused, with the silos' "
                        "secrets, so a second call prepares the same matrices)")
    parser.add_argument("--no-central", action="store_true")
    parser.add_argument("--on", choices=("test", "val"), default="test",
                        help="score the test people (default) or the validation people, "
                        "on which settings are chosen")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    data = load(args.parties)
    splits = {}
    for seed in seeds:
        drawn = random_split(data.y, SplitConfig(), secret(seed, "authority").generator("split"))
        splits[seed] = Split(drawn.train, drawn.val, drawn.test)
    print("| model | eps_model (accounted) | delta | joint sigma | test AUC mean (per seed) "
          "| train s per seed (+ noise calibration) |", flush=True)
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    if not args.no_central:
        rows = [central(data, splits[s], s, args.on) for s in seeds]
        print(f"| central LightGBM (rounds {', '.join(str(r['rounds']) for r in rows)}) | inf "
              f"| n/a | n/a | {summary([r['auc'] for r in rows])} "
              f"| {statistics.mean(r['seconds'] for r in rows):.1f} |", flush=True)
    for variant in json.loads(args.variants):
        for eps in epsilons:
            rows = [dp_trees(data, splits[s], s, eps, variant, args.on) for s in seeds]
            spent = max(r["epsilon"] for r in rows)
            delta = f"{max(r['delta'] for r in rows):.2e}" if math.isfinite(eps) else "n/a"
            print(f"| DP random trees {json.dumps(variant)} | {eps:g} ({spent:.3f}) "
                  f"| {delta} | {rows[0]['sigma']:.2f} "
                  f"| {summary([r['auc'] for r in rows])}"
                  + (f" [stage alone {summary([r['stage_auc'] for r in rows])}]"
                     if "init_share" in variant else "") + " "
                  f"| {statistics.mean(r['seconds'] for r in rows):.1f} "
                  f"(+ {statistics.mean(r['calibrate'] for r in rows):.1f}) |", flush=True)


if __name__ == "__main__":
    main()
