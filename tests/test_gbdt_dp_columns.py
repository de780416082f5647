"""Per-source-column draws of the DP random trees (bench/gbdt_dp_sources.py): the grouping
from the prepared matrix's names, the weights, and the draw that follows them."""

from __future__ import annotations

import numpy as np
import pytest

from bench.gbdt_dp_sources import source_index, source_weights
from clients.silo.gbdt import GbdtSilo
from crypto.secret_random import SecretRandom
from server.gbdt_dp import DpTreeParams, draw_structure

# A silo's matrix as clients/silo/data.py names it: numeric columns, their indicators, then
# one-hot levels of a declared categorical column ending in `=missing`.
NAMES = ["amt", "bal", "amt__missing", "bal__missing",
         "pay=-1", "pay=0", "pay=1", "pay=2", "pay=missing"]


def test_source_index_groups_indicators_and_levels_with_their_column() -> None:
    assert source_index(NAMES).tolist() == [0, 1, 0, 1, 2, 2, 2, 2, 2]
    # a name holding "__missing" after "=" is a level, not an indicator
    assert source_index(["c=a__missing", "c=b"]).tolist() == [0, 0]


def test_source_weights_share_each_sources_weight_among_its_inputs() -> None:
    sources = source_index(NAMES)
    equal = source_weights(sources, 0.0)
    totals = np.bincount(sources, weights=equal)
    assert np.allclose(totals, 1.0)  # every source the same total
    assert np.allclose(equal[4:], 0.2)
    assert np.allclose(source_weights(sources, 1.0), 1.0)  # power 1: the uniform draw
    half = np.bincount(sources, weights=source_weights(sources, 0.5))
    assert np.allclose(half, np.sqrt([2, 2, 5]))
    with pytest.raises(ValueError, match="source index"):
        source_weights(np.array([-1, 0]), 0.0)


def test_the_draw_follows_source_weights() -> None:
    rng = np.random.default_rng(0)
    silos = {"a": GbdtSilo("a", rng.uniform(-1, 1, (50, len(NAMES))), bins=8),
             "b": GbdtSilo("b", rng.uniform(-1, 1, (50, 1)), bins=8)}
    weights = {"a": source_weights(source_index(NAMES), 0.0).tolist(), "b": [1.0]}
    params = DpTreeParams(trees=400, depth=3, bins=8)
    structure = draw_structure(silos, params, SecretRandom(b"\x02" * 32).generator("s"), weights)
    picks = [(s.silo, s.feature) for tree in structure for s in tree.values()]
    share = sum(1 for p in picks if p[0] == "a" and p[1] >= 4) / len(picks)
    # the 5 one-hot levels are ONE source of the 4 (3 in silo a, 1 in b): a quarter of the
    # draws, where the uniform draw gives them 5 of 10 inputs
    assert abs(share - 0.25) < 0.03
    assert sum(1 for p in picks if p == ("b", 0)) / len(picks) == pytest.approx(0.25, abs=0.03)
