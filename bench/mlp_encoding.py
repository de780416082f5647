"""Input encodings for the federated DP MLP (issue 20 acceptance: the MLP with default settings
at eps 1 >= 0.76 on UCI), in process.

Each silo's bottom model sees its prepared numeric columns either as they are (`scaled`, what a
run does) or through a fixed thermometer code over equal-width pre-bins of the prepared scale
(`thermometer` below; data-independent post-processing of the accounted preparation, so no
privacy cost), the code the DP scorecard bins on. Training is bench/mlp_averaging.py
`run_cell` (the real SiloTrainer, BiasHead, DP-SGD from a secret stream, randomised response,
PrivacyPlan's noise at combined eps 1, the joint clip split over the blocks, chunks of 4).

A cell is bench/mlp_averaging.py's `key=value,...` plus: enc (scaled, thermometer,
scaled+thermometer), nb (pre-bins, 32), u (units, 4), central (1: every column in ONE silo and
clean labels, a cheap stand-in for the central DP model on the same encoding; a diagnostic, not
a protocol). h=0 is a linear bottom model (no hidden layer). Choose on VALIDATION AUC; the
bench's own 15 % test split is printed beside it, never used to choose.

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/mlp_encoding.py --data uci --seeds 0 1 2 \
        --cell h=16 --cell h=16,enc=thermometer
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlp_averaging import DEFAULT_CELL, run_cell
from mlp_cells import parse_cell, print_averages, print_means
from stale_gradients import Joined

from clients.protocol.schema import AUTHORITY, federation_silos, silo_salt
from clients.silo.data import load_silo
from server.labels import load_labels
from simulations.data.mapping import resolve_mapping
from simulations.data.paths import Parties
from simulations.data.population import PopulationConfig
from simulations.data.real_data import import_parties
from simulations.run.experiment import prepare_parties

ENCODINGS = ("scaled", "thermometer", "scaled+thermometer")
# The DP scorecard's pre-bins (server/scorecard_dp.py): 32 equal-width bins over +-4 units.
DEFAULT_BINS = 32
DEFAULT_UNITS = 4.0


def thresholds(bins: int = DEFAULT_BINS, units: float = DEFAULT_UNITS) -> np.ndarray:
    """The bins - 1 inner edges, ascending, fixed by (bins, units) alone."""
    if bins < 2:
        raise ValueError("bins must be at least 2")
    if not units > 0:
        raise ValueError("units must be positive")
    step = 2.0 * units / bins
    return -units + step * np.arange(1, bins, dtype=np.float64)


def thermometer(x: np.ndarray, bins: int = DEFAULT_BINS,
                units: float = DEFAULT_UNITS) -> np.ndarray:
    """(rows, columns * (bins - 1)) float32, column-major by input column: bit j of column c
    is `step` where x[:, c] > t_j, else 0. NaN is refused (prepared values have none)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("x must be (rows, columns)")
    if np.isnan(x).any():
        raise ValueError("x has missing values: prepare the table first")
    edges = thresholds(bins, units)
    step = np.float32(2.0 * units / bins)
    bits = (x[:, :, None] > edges[None, None, :]).astype(np.float32)
    bits *= step
    return bits.reshape(len(x), x.shape[1] * (bins - 1))


def encode(x: np.ndarray, numeric: int, encoding: str = "scaled", bins: int = DEFAULT_BINS,
           units: float = DEFAULT_UNITS) -> np.ndarray:
    """The model inputs for a prepared matrix whose first `numeric` columns are the
    standardised numeric values: `scaled` returns `x` unchanged; otherwise those columns are
    replaced by (`scaled+thermometer`: followed by) their thermometer code, and the rest of the
    matrix (missing indicators, one-hot columns) follows unchanged."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}")
    if not 0 <= numeric <= x.shape[1]:
        raise ValueError("numeric must lie in [0, columns]")
    if encoding == "scaled":
        return x
    code = thermometer(x[:, :numeric], bins, units)
    head = [x[:, :numeric].astype(np.float32)] if encoding == "scaled+thermometer" else []
    return np.concatenate([*head, code, x[:, numeric:].astype(np.float32)], axis=1)


def encoded_names(columns: list[str] | tuple[str, ...], numeric: int, encoding: str = "scaled",
                  bins: int = DEFAULT_BINS) -> list[str]:
    """Names of `encode`'s output columns: `col>j` for bit j (1-based) of a numeric column."""
    if encoding == "scaled":
        return list(columns)
    bits = [f"{c}>{j}" for c in columns[:numeric] for j in range(1, bins)]
    head = list(columns[:numeric]) if encoding == "scaled+thermometer" else []
    return [*head, *bits, *columns[numeric:]]


OWN_KEYS = {"enc": "scaled", "nb": "32", "u": "4", "central": "0"}


def load(data: str | None, users: int, seed: int, root: Path) -> tuple[Joined, list[int]]:
    """bench/stale_gradients.py `load`, keeping each silo's count of numeric columns."""
    parties = Parties(root)
    if data is None:
        prepare_parties(PopulationConfig(users=users, seed=seed), parties)
    else:
        import_parties(resolve_mapping(data), root)
    ids, y = load_labels(parties.party(AUTHORITY))
    silos = federation_silos(root)
    tables = [load_silo(parties.party(s), s) for s in silos]
    common = set(ids.to_numpy())
    for t in tables:
        common &= set(t.ids.to_numpy())
    index = pd.Index(np.array(sorted(common), dtype=object))
    xs = [t.x[pd.Index(t.ids.to_numpy()).get_indexer(index)] for t in tables]
    yy = y[pd.Index(ids.to_numpy()).get_indexer(index)].astype(np.float64)
    perm = np.random.default_rng([seed, 0x57A1E]).permutation(len(index))
    a, b = int(0.7 * len(index)), int(0.85 * len(index))
    numeric = [len(t.prep.numeric) if t.prep is not None else 0 for t in tables]
    return (Joined(xs, yy, np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:]),
                   [silo_salt(s) for s in silos]), numeric)


def split_cell(text: str) -> tuple[dict[str, str], dict[str, str]]:
    own = dict(OWN_KEYS)
    rest = []
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        if key in own:
            own[key] = value
        else:
            rest.append(item)
    cell = parse_cell(",".join(rest), DEFAULT_CELL)
    return cell, own


def encoded(data: Joined, numeric: list[int], own: dict[str, str]) -> Joined:
    xs = [encode(x, d, own["enc"], int(own["nb"]), float(own["u"]))
          for x, d in zip(data.xs, numeric, strict=True)]
    if own["central"] == "1":
        xs = [np.concatenate(xs, axis=1)]
        return replace(data, xs=xs, salts=data.salts[:1])
    return replace(data, xs=xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="uci, a CSV or a mapping directory")
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cell", action="append", required=True)
    ap.add_argument("--averages", nargs="+", default=["last"])
    args = ap.parse_args()
    names = tuple(args.averages)
    cells = [split_cell(c) for c in args.cell]
    results: dict[int, list[dict]] = {i: [] for i in range(len(cells))}
    for seed in args.seeds:
        secret = secrets.token_bytes(32)  # the same DP draws for every cell of this seed
        with tempfile.TemporaryDirectory(prefix="mlpenc-") as tmp:
            data, numeric = load(args.data, args.users, seed, Path(tmp) / "parties")
        print(f"data={args.data or f'generated {args.users:,}'} seed={seed} "
              f"people={len(data.y):,} train={len(data.train):,} numeric={numeric} "
              f"inputs={[x.shape[1] for x in data.xs]}", flush=True)
        for i, (cell, own) in enumerate(cells):
            view = encoded(data, numeric, own)
            if own["central"] == "1":
                cell = {**cell, "label": "inf"}
            r = run_cell(view, cell, seed, secret, names)
            results[i].append(r)
            print(f"  {args.cell[i]} inputs {[x.shape[1] for x in view.xs]} steps {r['steps']} "
                  f"sigma_j {r['joint_sigma']:.2f} sigma {r['sigma']:.2f} "
                  f"{r['seconds']:.1f} s", flush=True)
            print_averages(r, names)
    print_means(args.cell, results, names, args.seeds)


if __name__ == "__main__":
    main()
