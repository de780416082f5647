"""Data-independent column draws of the DP random trees (server/gbdt_dp.py).

One-column trees (`DpTreeParams.single_column`): each tree cuts ONE column at sorted random
thresholds laid out as a search tree, so its leaves are that column's intervals (an additive
model, as DP-EBM). Drawn from the authority's stream, reading no data.

`draw_structure` (server/gbdt_dp.py) also takes a draw weight per input column; `fedscore run`
keeps the uniform draw, and the per-source weights that were measured against it live in
bench/gbdt_dp_sources.py (no power beat the uniform draw on UCI's validation people).
"""

from __future__ import annotations

import numpy as np


def _in_order(depth: int) -> list[int]:
    """Heap indices of a complete tree of `depth` levels in in-order (left, node, right)."""
    order: list[int] = []

    def visit(node: int) -> None:
        if node < 2**depth - 1:
            visit(2 * node + 1)
            order.append(node)
            visit(2 * node + 2)

    visit(0)
    return order


def single_column(trees: int, depth: int, bins: int, p: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(trees, nodes) column and bin picks for one-column trees: columns cycled in rounds
    (each round a fresh random order of the columns of positive weight), thresholds sorted
    and placed in-order, so the leaves are the column's consecutive intervals (distinct
    thresholds while there are enough bins; a repeated one only leaves an interval empty)."""
    internal = 2**depth - 1
    columns = np.flatnonzero(p > 0)
    rounds = -(-trees // len(columns))
    order = np.concatenate([rng.permutation(columns) for _ in range(rounds)])[:trees]
    picks = np.repeat(order[:, None], internal, axis=1)
    picked = np.empty((trees, internal), dtype=np.int64)
    place = np.array(_in_order(depth))
    replace_ = internal > bins - 1
    for t in range(trees):
        picked[t, place] = np.sort(rng.choice(bins - 1, size=internal, replace=replace_))
    return picks, picked
