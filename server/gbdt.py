"""The authority's side of vertical gradient-boosted trees, SecureBoost-style (issue 20 item 1).

`fit_trees` and `predict_trees` drive the protocol of clients/protocol/gbdt.py through
`SiloEndpoint`s called in-process (plain g, h, which reveal the labels: simulation only);
`grow_tree` also serves `fedscore run --set model.kind=gbdt` (server/gbdt_run.py), whose
silos are a `LevelSilos`: one Flower message per silo and level, with g, h from randomised
labels or under encryption.

The maths is XGBoost's second-order boosting for logistic loss: g = p - y, h = p (1 - p) at the
current margin; a split's gain 1/2 [GL^2/(HL+lambda) + GR^2/(HR+lambda) - G^2/(H+lambda)] -
gamma, valid when both children keep at least `min_child_weight` of hessian; a leaf's weight
-G/(H+lambda) times the learning rate. Trees grow level by level (XGBoost's depthwise policy,
which is also what a level-per-round protocol does) to `depth`; a node without a split gaining
more than MIN_GAIN becomes a leaf. The first margin is the training log-odds (LightGBM's and
XGBoost's boost-from-average): the authority holds the labels, so this discloses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from clients.protocol.gbdt import (
    EncryptedGradients,
    EncryptedNodeHistogram,
    Gradients,
    HistogramReply,
    HistogramRequest,
    NodeRows,
    RouteRequest,
    SiloEndpoint,
    SplitReply,
    SplitRequest,
)
from crypto import he

log = logging.getLogger(__name__)

EMPTY = 1e-9  # a child with less than this share of its node's hessian holds no rows
# XGBoost's kRtEps: a split must gain more than this, so that rounding (float sums taken by
# subtraction, or HE's fixed point at 2^-21 a row) never makes a useless split look positive.
MIN_GAIN = 1e-6


@dataclass(frozen=True, kw_only=True)
class GbdtParams:
    trees: int = 50
    depth: int = 5
    bins: int = 32
    lr: float = 0.1
    lambda_: float = 1.0
    min_child_weight: float = 1.0
    gamma: float = 0.0
    # "he": the silos see g, h only under BFV and return encrypted sums (crypto/he.py; bins
    # must then be a power of two). "plain" reveals labels to the silos: simulation only.
    protection: Literal["plain", "he"] = "plain"
    # How the silos bin (clients/silo/gbdt.py `Binning`): equal width over a fixed range, or
    # each silo's own quantiles of its training rows. The authority only says which.
    binning: Literal["uniform", "quantile"] = "uniform"

    def __post_init__(self) -> None:
        if self.trees < 1 or self.depth < 1:
            raise ValueError("trees and depth must be at least 1")
        if self.lambda_ < 0 or self.min_child_weight < 0 or self.gamma < 0:
            raise ValueError("lambda_, min_child_weight and gamma must be >= 0")
        if not 0 < self.lr <= 1 or not 2 <= self.bins <= 256:
            raise ValueError("lr must lie in (0, 1] and bins in [2, 256]")


@dataclass(frozen=True, kw_only=True)
class Split:
    """What the authority knows of a split: whose column, which one, which bin (<= goes left)."""

    silo: str
    feature: int
    bin: int


@dataclass(frozen=True, kw_only=True)
class Tree:
    """Nodes in heap order (children of i: 2i+1 left, 2i+2 right)."""

    splits: dict[int, Split] = field(default_factory=dict)
    leaves: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Model:
    params: GbdtParams
    base_margin: float
    trees: tuple[Tree, ...]


def sigmoid(margin: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-margin))


def gradients(margin: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logistic loss: g = p - y, h = p (1 - p)."""
    p = sigmoid(margin)
    return p - y, p * (1.0 - p)


def _score(g: np.ndarray | float, h: np.ndarray | float, lambda_: float) -> np.ndarray:
    return np.square(g) / (np.asarray(h) + lambda_)


def split_gains(
    g_hist: np.ndarray, h_hist: np.ndarray, g_total: float, h_total: float, params: GbdtParams
) -> np.ndarray:
    """(features, bins - 1) gain of "bin <= b goes left"; -inf where a child is too light.

    The node's totals come from the authority's own g, h (not from a silo's histograms), so
    every silo's candidates are scored against the same parent.
    """
    gl = np.cumsum(g_hist, axis=1)[:, :-1]
    hl = np.cumsum(h_hist, axis=1)[:, :-1]
    gr, hr = g_total - gl, h_total - hl
    lam = params.lambda_
    with np.errstate(divide="ignore", invalid="ignore"):  # lambda_ = 0 and an empty child
        gain = 0.5 * (_score(gl, hl, lam) + _score(gr, hr, lam) - _score(g_total, h_total, lam))
    gain -= params.gamma
    # A child must carry at least min_child_weight of hessian, and more than rounding: sums
    # taken from the parent by subtraction leave ~1e-16 relative residue in an empty child, and
    # a "split" that moves nothing to one side would otherwise pass when min_child_weight is 0.
    floor = max(params.min_child_weight, EMPTY * h_total)
    ok = (hl >= floor) & (hr >= floor) & (hl > 0) & (hr > 0)
    return np.where(ok, gain, -np.inf)


def best_split(
    replies: Mapping[str, tuple[np.ndarray, np.ndarray]],
    g_total: float,
    h_total: float,
    params: GbdtParams,
) -> tuple[Split, float] | None:
    """The best split over every silo's (G, H) of one node, or None if none gains more than
    MIN_GAIN.

    Ties go to the first silo in the mapping's order, then the lowest feature, then the lowest
    bin, so a run over the joined matrix (silos' columns concatenated in that order) chooses
    the same splits.
    """
    best: tuple[Split, float] | None = None
    for silo, (g_hist, h_hist) in replies.items():
        gains = split_gains(g_hist, h_hist, g_total, h_total, params)
        if gains.size == 0:
            continue
        flat = int(np.argmax(gains))
        gain = float(gains.flat[flat])
        if gain > MIN_GAIN and (best is None or gain > best[1]):
            feature, bin = divmod(flat, gains.shape[1])
            best = (Split(silo=silo, feature=feature, bin=bin), gain)
    return best


def leaf_value(g_total: float, h_total: float, params: GbdtParams) -> float:
    return -params.lr * g_total / (h_total + params.lambda_)


Sums = dict[str, tuple[np.ndarray, np.ndarray]]  # per silo: (G, H), each (features, bins)


def grow_tree(
    silos: Mapping[str, SiloEndpoint], g: np.ndarray, h: np.ndarray, tree_id: int,
    params: GbdtParams, keys: he.SecretHe | None = None,
) -> tuple[Tree, np.ndarray]:
    """One tree level by level; also returns each training row's leaf value. With `keys`,
    g and h go out encrypted (once per tree) and the silos' sums come back encrypted."""
    send_gradients(silos, g, h, tree_id, keys)
    splits: dict[int, Split] = {}
    leaves: dict[int, float] = {}
    values = np.zeros(len(g))
    open_nodes: dict[int, np.ndarray] = {0: np.arange(len(g), dtype=np.int64)}
    parents: dict[int, Sums] = {}
    for level in range(params.depth + 1):
        if not open_nodes:
            break
        if level == params.depth:
            found: dict[int, Split | None] = dict.fromkeys(open_nodes)
        else:
            sums = _level_sums(silos, open_nodes, parents, tree_id, params.bins, keys)
            found = {node: _node_split(sums[node], g[rows], h[rows], params)
                     for node, rows in open_nodes.items()}
            parents = sums
        asked: dict[str, list[SplitRequest]] = {}
        for node, rows in open_nodes.items():
            split = found[node]
            if split is None:
                value = leaf_value(float(g[rows].sum()), float(h[rows].sum()), params)
                leaves[node] = value
                values[rows] = value
                continue
            asked.setdefault(split.silo, []).append(SplitRequest(
                tree=tree_id, node=node, feature=split.feature, bin=split.bin, rows=rows))
        lefts = _partitions(silos, asked)
        children: dict[int, np.ndarray] = {}
        for node, rows in open_nodes.items():
            split = found[node]
            if split is None:
                continue
            left = lefts[node]
            if left.shape != rows.shape:
                raise ValueError(f"silo {split.silo} returned a partition of the wrong size")
            splits[node] = split
            children[2 * node + 1], children[2 * node + 2] = rows[left], rows[~left]
        open_nodes = children
    return Tree(splits=splits, leaves=leaves), values


@runtime_checkable
class LevelSilos(Protocol):
    """Silos addressed a level at a time: one message per silo carrying all of a level's
    nodes, every silo at once (the Flower wiring, server/gbdt_run.py). A plain mapping of
    `SiloEndpoint`s is asked one call at a time instead (in process)."""

    def send_gradients(self, msg: Gradients | EncryptedGradients) -> None: ...

    def histograms_all(self, msg: HistogramRequest) -> dict[str, HistogramReply]: ...

    def splits_all(self, asked: Mapping[str, list[SplitRequest]]
                   ) -> dict[str, list[SplitReply]]: ...


def _partitions(silos: Mapping[str, SiloEndpoint], asked: Mapping[str, list[SplitRequest]]
                ) -> dict[int, np.ndarray]:
    """{node: left mask over its rows} for a level's chosen splits, each from its owner."""
    if isinstance(silos, LevelSilos):
        replies = silos.splits_all(asked)
    else:
        replies = {name: [silos[name].split(r) for r in requests]
                   for name, requests in asked.items()}
    out: dict[int, np.ndarray] = {}
    for name, requests in asked.items():
        answered = {reply.node: reply for reply in replies.get(name, [])}
        for request in requests:
            if request.node not in answered:
                raise ValueError(f"silo {name} did not partition node {request.node}")
            out[request.node] = np.asarray(answered[request.node].left, dtype=bool)
    return out


def send_gradients(
    silos: Mapping[str, SiloEndpoint], g: np.ndarray, h: np.ndarray, tree_id: int,
    keys: he.SecretHe | None,
) -> None:
    """Every silo gets the rows' (g, h): in the clear, or under BFV when `keys` is given (the
    silos then hold only the public and rotation keys)."""
    message: Gradients | EncryptedGradients = Gradients(tree=tree_id, g=g, h=h)
    if keys is not None:
        pairs = he.encrypt_pairs(keys.public, g=g, h=h)
        message = EncryptedGradients(tree=tree_id, public=keys.public, pairs=pairs)
    if isinstance(silos, LevelSilos):
        silos.send_gradients(message)
        return
    for silo in silos.values():
        silo.gradients(message)


def _node_split(sums: Sums, g: np.ndarray, h: np.ndarray, params: GbdtParams) -> Split | None:
    best = best_split(sums, float(g.sum()), float(h.sum()), params)
    return None if best is None else best[0]


def _level_sums(
    silos: Mapping[str, SiloEndpoint], open_nodes: dict[int, np.ndarray],
    parents: dict[int, Sums], tree_id: int, bins: int, keys: he.SecretHe | None,
) -> dict[int, Sums]:
    """Every open node's histograms per silo. Siblings are opened together, so the silos sum
    only the smaller of each pair and the authority takes the other from the parent's sums
    (LightGBM's and XGBoost's subtraction trick): half the silos' work, and under encryption
    half the ciphertext work. Both sides of a lossless comparison subtract alike."""
    asked = [n for n in open_nodes
             if n == 0 or _size(n, open_nodes) < _size(_sibling(n), open_nodes)]
    request = HistogramRequest(
        tree=tree_id, nodes=tuple(NodeRows(node=n, rows=open_nodes[n]) for n in asked))
    raw = (silos.histograms_all(request) if isinstance(silos, LevelSilos)
           else {name: silo.histograms(request) for name, silo in silos.items()})
    replies = {name: node_sums(raw[name], silo.features, bins, keys)
               for name, silo in silos.items()}
    for name, reply in replies.items():
        if set(reply) != set(asked):
            raise ValueError(f"silo {name} answered for other nodes than asked")
    sums: dict[int, Sums] = {n: {name: r[n] for name, r in replies.items()} for n in asked}
    for n in asked:
        if n == 0:
            continue
        parent, sibling = parents[(n - 1) // 2], _sibling(n)
        sums[sibling] = {name: (pg - sums[n][name][0], ph - sums[n][name][1])
                         for name, (pg, ph) in parent.items()}
    return sums


def _size(node: int, open_nodes: dict[int, np.ndarray]) -> tuple[int, int]:
    """Order of siblings for the silos' work: fewer rows first, a tie to the left child."""
    return len(open_nodes[node]), node


def _sibling(node: int) -> int:
    return node + 1 if node % 2 else node - 1


def node_sums(
    reply: HistogramReply, features: int, bins: int, keys: he.SecretHe | None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A silo's reply as {node: (G, H)}, each (features, bins): decrypted with `keys`, checked
    for shape, and refused when its protection is not the one asked for."""
    out = {}
    for node in reply.nodes:
        if isinstance(node, EncryptedNodeHistogram):
            if keys is None or node.sums.features != features:
                raise ValueError(f"silo {reply.silo} sent unexpected encrypted sums")
            g, h = he.decrypt_sums(keys, sums=node.sums)
            out[node.node] = (g, h)
            continue
        if keys is not None:
            raise ValueError(f"silo {reply.silo} sent plain sums under encryption")
        sums = node
        if sums.g.shape != (features, bins) or sums.h.shape != (features, bins):
            raise ValueError(f"silo {reply.silo} sent histograms of the wrong shape")
        out[sums.node] = (sums.g, sums.h)
    return out


def fit_trees(
    silos: Mapping[str, SiloEndpoint], y: np.ndarray, params: GbdtParams
) -> Model:
    """Boost `params.trees` trees over the silos' columns; y is the authority's 0/1 labels."""
    if not silos:
        raise ValueError("at least one silo is needed")
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y must be a 1-d array of 0/1 labels")
    rate = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    base = float(np.log(rate / (1 - rate)))
    margin = np.full(len(y), base)
    keys = he.keygen(params=he.HeParams(bins=params.bins)) if params.protection == "he" else None
    trees = []
    for t in range(params.trees):
        g, h = gradients(margin, y)
        tree, values = grow_tree(silos, g, h, t, params, keys)
        margin += values
        trees.append(tree)
        log.debug("tree %d: %d splits, %d leaves", t, len(tree.splits), len(tree.leaves))
    return Model(params=params, base_margin=base, trees=tuple(trees))


def predict_trees(model: Model, silos: Mapping[str, SiloEndpoint], rows: int) -> np.ndarray:
    """Margins of `rows` people: each silo evaluates its own splits (routing bits), the
    authority walks the trees with them."""
    margin = np.full(rows, model.base_margin)
    for values in tree_values(model, silos, rows):  # tree by tree, as the run's scoring adds
        margin += values
    return margin


def tree_values(model: Model, silos: Mapping[str, SiloEndpoint], rows: int) -> np.ndarray:
    """(trees, rows): each tree's leaf value for each of `rows` people (the margin after k
    trees is the base margin plus the first k rows' sum), from one routing request per silo."""
    owned: dict[str, list[tuple[int, int, Split]]] = {name: [] for name in silos}
    for t, tree in enumerate(model.trees):
        for node, split in tree.splits.items():
            if split.silo not in owned:
                raise ValueError(f"the model splits on silo {split.silo}, which is not here")
            owned[split.silo].append((t, node, split))
    bits: dict[tuple[int, int], np.ndarray] = {}
    for name, splits in owned.items():
        if not splits:
            continue
        request = RouteRequest(splits=tuple((s.feature, s.bin) for *_, s in splits))
        reply = silos[name].route(request)
        if reply.left.shape != (len(splits), rows):
            raise ValueError(f"silo {name} returned routing bits of the wrong shape")
        for (t, node, _), left in zip(splits, reply.left, strict=True):
            bits[(t, node)] = left
    out = np.zeros((len(model.trees), rows))
    for t, tree in enumerate(model.trees):
        position = np.zeros(rows, dtype=np.int64)
        # Children have larger heap indices than their parent: one pass in order routes all.
        for n in sorted(tree.splits):
            at = position == n
            position[at] = np.where(bits[(t, n)][at], 2 * n + 1, 2 * n + 2)
        table = np.zeros(max(tree.leaves) + 1)
        table[list(tree.leaves)] = list(tree.leaves.values())
        out[t] = table[position]
    return out
