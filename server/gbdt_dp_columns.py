"""Data-independent column draws of the DP random trees (server/gbdt_dp.py).

One-column trees (`DpTreeParams.single_column`): each tree cuts ONE column at sorted random
thresholds laid out as a search tree, so its leaves are that column's intervals (an additive
model, as DP-EBM). Drawn from the authority's stream, reading no data.

Per-source weights (`source_index`, `source_weights`): a draw weight per input column from the
grouping of a silo's inputs by the table column they come from, read from the prepared
matrix's names alone. Measured on UCI's validation people at eps 1 (bench/RESULTS.md "DP trees:
per-source columns, cut one-hot levels, guided shallow trees"): no power beats the uniform draw
(power 0.5 ties, 0 loses 0.006), so `fedscore run` keeps the uniform draw and only the bench
uses them; they are also the grouping a per-source split release would use.
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


def source_weights(sources: np.ndarray, power: float) -> np.ndarray:
    """Per column, its draw weight when each SOURCE column (the table column a silo's input
    comes from: a numeric value with its `__missing` indicator, or every one-hot level of a
    categorical column, clients/silo/data.py) weighs k^power in total, k its input count,
    shared equally among its inputs. `sources`: each input's source index. power 1 gives
    every input weight 1 (the uniform draw); 0 every source the same weight, so a one-hot
    column of 13 levels is drawn as often as one numeric column; between, in between. The
    grouping comes from the schema (declared categories) and column names, never the data."""
    sources = np.asarray(sources, dtype=np.int64)
    if sources.ndim != 1 or (sources < 0).any():
        raise ValueError("sources needs one non-negative source index per input column")
    count = np.bincount(sources)[sources].astype(np.float64)
    return count ** (power - 1.0)


def source_index(columns: list[str] | tuple[str, ...]) -> np.ndarray:
    """Each input column's source index from the prepared matrix's names alone
    (clients/silo/data.py: `<col>`, `<col>__missing`, `<col>=<value>`), in first-seen order."""
    order: dict[str, int] = {}
    out = []
    for name in columns:
        base = name.split("=", 1)[0] if "=" in name else name.removesuffix("__missing")
        out.append(order.setdefault(base, len(order)))
    return np.array(out, dtype=np.int64)
