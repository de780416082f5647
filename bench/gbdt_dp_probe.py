"""Probes of the DP trees (bench/gbdt_dp.py) that are NOT mechanisms: they answer "how much
could this lead give at most?" before it is built (bench/RESULTS.md "DP trees: per-source
columns, cut one-hot levels, guided shallow trees"). Nothing here is accounted as printed.

`--guide-noise F` scales the guided trees' split-histogram noise by F (0: exact histograms)
while the leaves keep the noise their plan calibrated: F = 0 bounds what any cheaper split
release could give; F = 0.65 is about the noise a per-source-column release would leave on
UCI (23 source columns against 112 inputs: each cell's noise falls by sqrt(23/112) = 0.45, but
a numeric column's bin sums two cells (missing or not) and a one-hot level's zero side sums
the other levels' cells). `--cut-binary` makes every random-tree node on a 0/1 input (one-hot
levels, `__missing` indicators: binary by construction, known from the names) cut between 0
and 1, instead of a uniform threshold of which about half send everyone one way (data-
independent: it would cost nothing).

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/gbdt_dp_probe.py --guide-noise 0 \\
        --seeds 0,1,2 --epsilons 1 --on val --no-central --variants '[{"guide_every": 150}]'
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import gbdt_dp as bench
from clients.silo.gbdt import bin_index
from server import gbdt_dp, gbdt_dp_guide

BINARY: dict[str, list[bool]] = {}


def scale_guide_noise(factor: float) -> None:
    stage_gains = gbdt_dp_guide.stage_gains

    def scaled(binned: Any, g: np.ndarray, h: np.ndarray, params: gbdt_dp.DpTreeParams,
               noise: tuple[float, float] | None, rng: np.random.Generator) -> np.ndarray:
        if noise is not None:
            noise = None if factor == 0 else (noise[0] * factor, noise[1] * factor)
        return stage_gains(binned, g, h, params, noise, rng)

    gbdt_dp_guide.stage_gains = scaled


def cut_binary() -> None:
    draw = gbdt_dp.draw_structure
    load = bench.load

    def drawn(silos: Mapping[str, Any], params: gbdt_dp.DpTreeParams, rng: np.random.Generator,
              weights: Mapping[str, Sequence[float]] | None = None) -> list[dict]:
        zero = int(bin_index(np.array([[0.0]]), params.bins)[0, 0])  # the bin of 0
        return [{n: replace(s, bin=zero) if BINARY[s.silo][s.feature] else s
                 for n, s in tree.items()} for tree in draw(silos, params, rng, weights)]

    def loaded(parties: Path) -> bench.Uci:
        data = load(parties)
        for s, cols in data.columns.items():
            BINARY[s] = ["=" in c or c.endswith("__missing") for c in cols]
        return data

    gbdt_dp.draw_structure = drawn
    bench.load = loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--guide-noise", type=float)
    parser.add_argument("--cut-binary", action="store_true")
    args, rest = parser.parse_known_args()
    if args.guide_noise is not None:
        scale_guide_noise(args.guide_noise)
    if args.cut_binary:
        cut_binary()
    sys.argv = [sys.argv[0], *rest]
    bench.main()


if __name__ == "__main__":
    main()
