"""What the in-process MLP benches (bench/mlp_defaults.py, bench/mlp_averaging.py) share: a cell
`key=value,...` over a bench's defaults, the command line's data and seeds, and one data set
per seed with the secret every cell of that seed draws its DP noise from (the same draws for
every cell, so cells compare on the same noise)."""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stale_gradients import Joined, load


def parse_cell(text: str, defaults: dict[str, str]) -> dict[str, str]:
    """`key=value,...` over `defaults` (an unknown key stops the bench)."""
    cell = dict(defaults)
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        if key not in cell:
            raise SystemExit(f"unknown cell key {key!r}: use {', '.join(cell)}")
        cell[key] = value
    return cell


def cell_arguments(doc: str) -> argparse.ArgumentParser:
    """The benches' common options: --data, --users, --seeds, --cell (repeated)."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="uci, a CSV or a mapping directory")
    ap.add_argument("--users", type=int, default=30000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cell", action="append", required=True)
    return ap


def seeded_data(args: argparse.Namespace, prefix: str) -> Iterator[tuple[int, bytes, Joined]]:
    """Per seed: (seed, a fresh secret for every cell of it, the data split with that seed),
    the data's size printed first."""
    for seed in args.seeds:
        secret = secrets.token_bytes(32)  # the same DP draws for every cell of this seed
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            data = load(args.data, args.users, seed, Path(tmp) / "parties")
        print(f"data={args.data or f'generated {args.users:,}'} seed={seed} "
              f"people={len(data.y):,} train={len(data.train):,}", flush=True)
        yield seed, secret, data


def print_averages(r: dict, names: list[str]) -> None:
    """One run's AUCs under each average (bench/mlp_averaging.py `run_cell`'s result)."""
    for n in names:
        print(f"    {n:9s} val {r['val'][n]:.4f} test {r['test'][n]:.4f}  val by epoch "
              + " ".join(f"{v:.3f}" for v in r["curve"][n]), flush=True)


def print_means(labels: list[str], results: Mapping[int, list[dict]], names: list[str],
                seeds: list[int]) -> None:
    """The cells' mean AUCs over the seeds, as a markdown table (what bench/RESULTS.md holds)."""
    print("\nmeans over seeds", seeds)
    print("| cell | average | val AUC | test AUC | val per seed |")
    print("| --- | --- | --- | --- | --- |")
    for i, label in enumerate(labels):
        rs = results[i]  # cell i's runs, one per seed
        for n in names:
            print(f"| {label} | {n} | {np.mean([r['val'][n] for r in rs]):.4f} | "
                  f"{np.mean([r['test'][n] for r in rs]):.4f} | "
                  + " ".join(f"{r['val'][n]:.4f}" for r in rs) + " |")
