"""Per-source draw weights of the DP random trees, measured against the uniform draw.

A draw weight per input column from the grouping of a silo's inputs by the table column they
come from, read from the prepared matrix's names alone (`draw_structure`'s `weights`,
server/gbdt_dp.py). Measured on UCI's validation people at eps 1 (bench/RESULTS.md "DP trees:
per-source columns, cut one-hot levels, guided shallow trees"): no power beats the uniform draw
(power 0.5 ties, 0 loses 0.006), so `fedscore run` keeps the uniform draw and only bench/gbdt_dp.py
(`source_power`) uses these; they are also the grouping a per-source split release would use.
"""

from __future__ import annotations

import numpy as np


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
