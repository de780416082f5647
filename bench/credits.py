"""The trees' reason-code credits (server/gbdt_reasons.py `Credits.add`): time and peak memory of
one accumulation per tree, the old dense one against the one over touched slots, in one
process on the same random trees (stop 34's review: the bincount allocated rows x columns
floats per tree).

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/credits.py --rows 100000 --trees 50 \
        --repeats 3

Random complete trees of `--depth` over three silos of 40 + 30 + 30 columns (the DP trees'
shape: depth 6, every inner node split); each person lands in a random leaf. The two are
timed in turn, `--repeats` times each (on a shared machine the load moves between runs:
compare the fastest of each). Both must give the same credits, bit for bit
(tests/test_gbdt_reasons.py checks it on random inputs too).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from server import gbdt
from server.gbdt_reasons import Credits

WIDTHS = {"payments": 40, "social": 30, "device": 30}


def dense_add(credits: Credits, tree: gbdt.Tree, values: np.ndarray, heap: np.ndarray) -> None:
    """`Credits.add` as it was until stop 35: one bincount over every (person, column) slot."""
    slot = np.full(len(values), -1, dtype=np.int64)
    for n, split in tree.splits.items():
        slot[n] = credits.offsets[split.silo] + split.feature
    node = np.asarray(heap, dtype=np.int64)
    who = np.arange(credits.rows)
    flats, steps = [], []
    while True:
        up = node > 0
        node, who = node[up], who[up]
        if not len(node):
            break
        parent = (node - 1) // 2
        flats.append(who * credits._slots + slot[parent])
        steps.append(values[node] - values[parent])
        node = parent
    if flats:
        credits._flat += np.bincount(np.concatenate(flats), weights=np.concatenate(steps),
                                     minlength=len(credits._flat))


def random_trees(rng: np.random.Generator, trees: int, depth: int, rows: int
                 ) -> list[tuple[gbdt.Tree, np.ndarray, np.ndarray]]:
    """(tree, node values by heap index, each person's leaf) of complete random trees."""
    silos = list(WIDTHS)
    inner, leaves = 2**depth - 1, 2**depth
    out = []
    for _ in range(trees):
        splits = {}
        for n in range(inner):
            silo = silos[int(rng.integers(len(silos)))]
            splits[n] = gbdt.Split(silo=silo, feature=int(rng.integers(WIDTHS[silo])), bin=0)
        tree = gbdt.Tree(splits=splits, leaves={inner + i: 0.0 for i in range(leaves)})
        out.append((tree, rng.normal(size=inner + leaves), inner + rng.integers(0, leaves, rows)))
    return out


def measure(add: Callable[[Credits, gbdt.Tree, np.ndarray, np.ndarray], None],
            trees: list, rows: int) -> tuple[Credits, float, float]:
    """(credits, seconds, peak MB above the credits table itself) of adding every tree."""
    credits = Credits(WIDTHS, rows)
    tracemalloc.start()
    t0 = time.perf_counter()
    for tree, values, heap in trees:
        add(credits, tree, values, heap)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return credits, seconds, peak / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--trees", type=int, default=50)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    trees = random_trees(np.random.default_rng(0), args.trees, args.depth, args.rows)
    print(f"{args.rows:,} people x {sum(WIDTHS.values())} columns, {args.trees} trees of "
          f"depth {args.depth} (credits table {args.rows * sum(WIDTHS.values()) * 8 / 1e6:.0f} "
          "MB, allocated before tracing)")
    runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(args.repeats):
        before, t_old, m_old = measure(dense_add, trees, args.rows)
        after, t_new, m_new = measure(Credits.add, trees, args.rows)
        if not np.array_equal(before._flat, after._flat):
            raise SystemExit("the credits differ")
        runs["before"].append((t_old, m_old))
        runs["after"].append((t_new, m_new))
    for name, what in (("before", "dense bincount"), ("after", "touched slots")):
        seconds = sorted(t for t, _ in runs[name])
        print(f"{what} ({name}): fastest {seconds[0]:.2f} s, all "
              + " ".join(f"{t:.2f}" for t, _ in runs[name])
              + f" s; peak {max(mb for _, mb in runs[name]):.1f} MB")
    print("identical credits: True")


if __name__ == "__main__":
    main()
