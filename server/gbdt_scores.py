"""Scoring with the trees over Flower (`model.kind=gbdt`): every split's left/right bits from
the silo owning it, each person's leaf, node values, margins with each silo's credited
contribution, and the validation curve that chooses how many trees to keep.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from clients.protocol.gbdt import RouteRequest
from server import gbdt
from server.gbdt_boost import Fitted
from server.gbdt_reasons import Credits, heap_values
from server.gbdt_silos import FlowerSilos
from server.metrics import auc, log_loss

HISTORY_POINTS = 10  # validation AUC after this many evenly spaced tree counts


Bits = dict[tuple[int, int], np.ndarray]  # (tree, node) -> left bit per routed person


def route(model: gbdt.Model, silos: FlowerSilos) -> Bits:
    """Every split's bits over the silos' route positions, one message per silo."""
    owned: dict[str, list[tuple[int, int, gbdt.Split]]] = {name: [] for name in silos}
    for t, tree in enumerate(model.trees):
        for node, split in tree.splits.items():
            owned[split.silo].append((t, node, split))
    asked = {name: RouteRequest(splits=tuple((s.feature, s.bin) for *_, s in splits))
             for name, splits in owned.items() if splits}
    replies = silos.route_all(asked)
    bits: Bits = {}
    for name, reply in replies.items():
        for (t, node, _), left in zip(owned[name], reply.left, strict=True):
            bits[(t, node)] = left
    return bits


def leaf_positions(tree: gbdt.Tree, t: int, bits: Bits, rows: int) -> np.ndarray:
    """Each person's leaf (heap index) in tree `t`: children have larger heap indices than
    their parent, so one pass in order routes all (as `gbdt.predict_trees` does)."""
    position = np.zeros(rows, dtype=np.int64)
    for n in sorted(tree.splits):
        at = position == n
        position[at] = np.where(bits[(t, n)][at], 2 * n + 1, 2 * n + 2)
    return position


def node_values(tree: gbdt.Tree, leaf: np.ndarray, g: np.ndarray, h: np.ndarray,
                params: gbdt.GbdtParams) -> dict[int, float]:
    """Every node's value: its leaf value, or for an inner node the leaf value it would have
    had (-lr G / (H + lambda) over the training rows through it)."""
    values = dict(tree.leaves)
    g_at = np.bincount(leaf, weights=g, minlength=max(tree.leaves) + 1)
    h_at = np.bincount(leaf, weights=h, minlength=max(tree.leaves) + 1)
    # Sums of a node's leaves below it, from the deepest nodes up.
    g_sum, h_sum = dict(enumerate(g_at)), dict(enumerate(h_at))
    for n in sorted(tree.splits, reverse=True):
        g_sum[n] = g_sum.get(2 * n + 1, 0.0) + g_sum.get(2 * n + 2, 0.0)
        h_sum[n] = h_sum.get(2 * n + 1, 0.0) + h_sum.get(2 * n + 2, 0.0)
        values[n] = gbdt.leaf_value(float(g_sum[n]), float(h_sum[n]), params)
    return values


@dataclass(frozen=True)
class Scored:
    margins: np.ndarray  # every routed person
    bias: float  # base margin + every tree's root value
    contributions: dict[str, np.ndarray]  # per silo, per person: margin moved by its splits
    history: list[dict]
    credits: Credits  # the same per (silo, column): what the reason codes rank
    values: tuple[np.ndarray, ...] = ()  # per tree, every node's value by heap index


def score(fitted: Fitted, bits: Bits, rows: int, train: np.ndarray, val: np.ndarray,
          y: np.ndarray, widths: Mapping[str, int] | None = None) -> Scored:
    """Margins of the routed people, with each silo's contribution: along each person's path
    in every tree, the change in node value at a split is credited to the (silo, column)
    owning the split (server/gbdt_reasons.py), so margin = bias + the silos' contributions
    exactly. Validation AUC is recorded at HISTORY_POINTS tree counts (y: clean labels of the
    routed people). `widths`: each silo's column count (default: as far as the splits use)."""
    model = fitted.model
    margin = np.full(rows, model.base_margin)
    bias = model.base_margin
    if widths is None:
        widths = {}
        for s in (s for t in model.trees for s in t.splits.values()):
            widths[s.silo] = max(widths.get(s.silo, 0), s.feature + 1)
    credits = Credits(widths, rows)
    every = max(1, len(model.trees) // HISTORY_POINTS)
    history, t0 = [], time.perf_counter()
    kept: list[np.ndarray] = []
    for t, tree in enumerate(model.trees):
        leaf = leaf_positions(tree, t, bits, rows)
        values = node_values(tree, leaf[train], *fitted.grads[t], model.params)
        bias += values[0]
        kept.append(heap_values(tree, values))
        credits.add(tree, kept[-1], leaf)
        table = np.zeros(max(tree.leaves) + 1)
        table[list(tree.leaves)] = list(tree.leaves.values())
        margin += table[leaf]
        if (t + 1) % every == 0 or t + 1 == len(model.trees):
            history.append(history_row(margin[val], y[val], t + 1, t0))
    return Scored(margin, bias, credits.contributions(), history, credits, tuple(kept))


def keep_best(fitted: Fitted, bits: Bits, val: np.ndarray, y: np.ndarray
              ) -> tuple[Fitted, list[dict]]:
    """The model cut to the number of trees with the best validation log loss (the first of
    equals), and the validation curve at HISTORY_POINTS tree counts plus the kept count (its
    row marked "kept"). Issue 20 item 5: no silent divergence. The validation people are the
    authority's own and their labels never reach a silo (they are clean even under rr), and
    the trees' epsilon is infinite anyway, so the choice costs no privacy budget.
    `bits` are every routed person's, `y` their clean labels."""
    model = fitted.model
    if not len(val):
        return fitted, []
    z = np.full(len(val), model.base_margin)
    val_bits = {k: v[val] for k, v in bits.items()}
    every = max(1, len(model.trees) // HISTORY_POINTS)
    curve, t0 = [], time.perf_counter()
    best, best_loss, best_z = len(model.trees), np.inf, z
    for t, tree in enumerate(model.trees):
        leaf = leaf_positions(tree, t, val_bits, len(val))
        table = np.zeros(max(tree.leaves) + 1)
        table[list(tree.leaves)] = list(tree.leaves.values())
        z = z + table[leaf]
        loss = log_loss(y[val], 1 / (1 + np.exp(-z)))
        if loss < best_loss:
            best, best_loss, best_z = t + 1, loss, z
        if (t + 1) % every == 0 or t + 1 == len(model.trees):
            curve.append(history_row(z, y[val], t + 1, t0))
    if best not in {row["trees"] for row in curve}:
        curve.append(history_row(best_z, y[val], best, t0))
    curve.sort(key=lambda row: row["trees"])
    for row in curve:
        if row["trees"] == best:
            row["kept"] = True
    kept = gbdt.Model(params=model.params, base_margin=model.base_margin,
                      trees=model.trees[:best])
    return Fitted(kept, fitted.grads[:best]), curve


def history_row(z: np.ndarray, y: np.ndarray, trees: int, t0: float) -> dict:
    p = 1 / (1 + np.exp(-z))
    both = len(np.unique(y)) == 2
    return {"epoch": trees, "trees": trees, "val_auc": auc(y, p) if both else None,
            "val_loss": log_loss(y, p), "seconds": time.perf_counter() - t0}


def contribution_summary(values: np.ndarray) -> dict[str, float]:
    """mean, mad (mean absolute deviation), q10, q50, q90: what `scoring.contribution_points`
    reads (exact here: the trees' release is not DP anyway)."""
    mean = float(values.mean())
    q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {"mean": mean, "mad": float(np.abs(values - mean).mean()),
            "q10": float(q10), "q50": float(q50), "q90": float(q90)}
