"""The trees' training and scoring phase of a run (`model.kind=gbdt`, issue 20 item 1): the
authority's driver of server/gbdt.py talking to the silos through Flower messages
(clients/silo/gbdt_handlers.py answers them).

Per tree, per level, two round trips with every silo at once: the level's histogram request
(with the tree's g, h on its root) to every silo, then the chosen splits' partitions from the
silos that own them, all of a silo's nodes in one message; never one message per node or row.
Scoring routes every aligned person through each silo's own splits (one message per silo).

Protection toward the silos (`gbdt.protection`):
- "rr": g, h are computed from the randomised-response labels the run drew once at
  privacy.label_epsilon (server/label_dp.py), with the forward-corrected gradient and its
  expected (Fisher) hessian, so everything a silo receives is post-processing of the RR
  labels: the ledger's label line is the whole account. At label_epsilon=inf the labels are
  clean and the silos can read them from the sign of g.
- "he": BFV-encrypted g, h (crypto/he.py) is implemented in process only
  (simulations/run/gbdt.py); its ciphertexts do not travel in Flower messages yet, so a run
  refuses it (`refuse_unwired`). For whoever wires it: SEAL objects serialise with their
  save/load (to files); the rotation (Galois) keys are 17 MB at ring 8192, a ciphertext 0.43 MB
  (4,096 rows of g, h), so the keys should go once per run into the silo's run directory, not
  into the node's Flower state, which travels with every message.

The trees themselves are released without differential privacy: this phase runs at
privacy.epsilon=inf and the run reports no eps_model (None: infinite). At a finite epsilon a
tree run trains the DP trees of server/gbdt_dp_run.py instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from flwr.app import Message

from clients.protocol import messages as m
from clients.protocol.gbdt import (
    LEVEL,
    ROUTE,
    SPLIT,
    STANDARD_UNITS,
    START,
    EncryptedGradients,
    Gradients,
    HistogramReply,
    HistogramRequest,
    NodeHistogram,
    RouteReply,
    RouteRequest,
    SplitReply,
    SplitRequest,
)
from server import gbdt, run_phases, scoring
from server.config import AuthorityConfig, ConfigError
from server.federation import Federation, FederationError
from server.label_dp import corrected_gradient, flip_probability
from server.metrics import auc, log_loss
from server.training import TrainResult

log = logging.getLogger(__name__)

HISTORY_POINTS = 10  # validation AUC after this many evenly spaced tree counts


def refuse_unwired(cfg: AuthorityConfig) -> None:
    """Refuse what this wiring cannot run, before any message is sent."""
    if cfg.gbdt.protection == "he":
        raise ConfigError(
            "gbdt.protection=he runs in process only in this version "
            "(simulations/run/gbdt.py: BFV ciphertexts are not serialised into Flower messages "
            "yet, and at 100,000 people 50 trees would take about 87 minutes); use "
            "gbdt.protection=rr, whose gradients are label-DP at privacy.label_epsilon")


class FlowerSilos(Mapping[str, "FlowerEndpoint"]):
    """The silos as server/gbdt.py addresses them (`gbdt.LevelSilos`): each level is one
    message per silo, sent to every silo at once and collected as they answer. Indexing gives
    one silo's `SiloEndpoint` (one message per request, for tests and one-off asks).

    Training rows are indices into the training positions announced by `start`; routing is
    over `route_positions`."""

    def __init__(self, fed: Federation, features: Mapping[str, int],
                 route_positions: np.ndarray | None = None) -> None:
        self.fed = fed
        self.features = dict(features)
        self.route_positions = route_positions
        self.round_trips = 0
        self.silo_seconds: dict[str, float] = dict.fromkeys(features, 0.0)
        self._pending: dict[str, Gradients] = {}

    def __getitem__(self, name: str) -> FlowerEndpoint:
        if name not in self.features:
            raise KeyError(name)
        return FlowerEndpoint(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.features)

    def _exchange(self, message_type: str, contents: Mapping) -> dict[str, Message]:
        replies = self.fed.exchange(message_type, contents)
        self.round_trips += 1
        for silo, reply in replies.items():  # what each silo says it computed
            seconds = float(m.get_config(reply).get("seconds", 0.0))
            self.silo_seconds[silo] = self.silo_seconds.get(silo, 0.0) + seconds
        return replies

    # ---- gbdt.LevelSilos ----------------------------------------------------------------------

    def send_gradients(self, msg: Gradients | EncryptedGradients) -> None:
        """Kept until the tree's root histograms go out: one message carries both."""
        for name in self.features:
            self._give(name, msg)

    def _give(self, name: str, msg: Gradients | EncryptedGradients) -> None:
        if not isinstance(msg, Gradients):
            raise ConfigError("encrypted gradients are not wired into Flower messages "
                              "(gbdt.protection=he runs in process only)")
        self._pending[name] = msg

    def histograms_all(self, msg: HistogramRequest) -> dict[str, HistogramReply]:
        return self._histograms(msg, list(self.features))

    def _histograms(self, msg: HistogramRequest, names: list[str]) -> dict[str, HistogramReply]:
        nodes = np.array([n.node for n in msg.nodes], dtype=np.int64)
        rows, sizes = _concat([n.rows for n in msg.nodes])
        contents = {}
        for name in names:
            grads = self._pending.pop(name, None)
            if grads is not None and grads.tree != msg.tree:
                raise ValueError(f"gradients for tree {grads.tree} sent with tree {msg.tree}")
            extra = {} if grads is None else {"g": grads.g, "h": grads.h}
            contents[name] = m.make_content({"tree": msg.tree}, nodes=nodes, rows=rows,
                                            sizes=sizes, **extra)
        replies = self._exchange(LEVEL, contents)
        return {name: _histogram_reply(name, msg.tree, reply) for name, reply in replies.items()}

    def splits_all(self, asked: Mapping[str, list[SplitRequest]]
                   ) -> dict[str, list[SplitReply]]:
        if not asked:
            return {}
        contents = {}
        for name, requests in asked.items():
            rows, sizes = _concat([r.rows for r in requests])
            contents[name] = m.make_content(
                {"tree": requests[0].tree},
                nodes=np.array([r.node for r in requests], dtype=np.int64),
                features=np.array([r.feature for r in requests], dtype=np.int64),
                bins=np.array([r.bin for r in requests], dtype=np.int64),
                rows=rows, sizes=sizes)
        replies = self._exchange(SPLIT, contents)
        return {name: _split_replies(name, asked[name], replies[name]) for name in asked}

    def route_all(self, asked: Mapping[str, RouteRequest]) -> dict[str, RouteReply]:
        """Every silo's bits for its splits over `route_positions`, all silos at once."""
        if self.route_positions is None:
            raise ValueError("no positions to route")
        positions = self.route_positions
        contents = {name: m.make_content(
            features=np.array([f for f, _ in r.splits], dtype=np.int64),
            bins=np.array([b for _, b in r.splits], dtype=np.int64),
            positions=positions) for name, r in asked.items()}
        replies = self._exchange(ROUTE, contents) if contents else {}
        out = {}
        for name, reply in replies.items():
            packed = m.get_array(reply, "left", np.uint8, 2)
            left = np.unpackbits(packed, axis=1, count=len(positions)).astype(bool)
            if left.shape != (len(asked[name].splits), len(positions)):
                raise FederationError(f"silo {name!r} returned routing bits of the wrong shape")
            out[name] = RouteReply(silo=name, left=left)
        return out


@dataclass(frozen=True)
class FlowerEndpoint:
    """One silo's `SiloEndpoint` over Flower: one message per request."""

    silos: FlowerSilos
    name: str

    @property
    def features(self) -> int:
        return self.silos.features[self.name]

    def gradients(self, msg: Gradients | EncryptedGradients) -> None:
        self.silos._give(self.name, msg)

    def histograms(self, msg: HistogramRequest) -> HistogramReply:
        return self.silos._histograms(msg, [self.name])[self.name]

    def split(self, msg: SplitRequest) -> SplitReply:
        return self.silos.splits_all({self.name: [msg]})[self.name][0]

    def route(self, msg: RouteRequest) -> RouteReply:
        return self.silos.route_all({self.name: msg})[self.name]


def _concat(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    rows = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, np.int64)
    return rows, sizes


def _histogram_reply(name: str, tree: int, reply: Message) -> HistogramReply:
    nodes = m.get_array(reply, "nodes", np.int64, 1)
    g = m.get_array(reply, "g", np.float64, 3)
    h = m.get_array(reply, "h", np.float64, 3)
    if not len(nodes) == len(g) == len(h):
        raise FederationError(f"silo {name!r} sent histograms for a different number of nodes")
    return HistogramReply(silo=name, tree=tree, nodes=tuple(
        NodeHistogram(node=int(n), g=g[i], h=h[i]) for i, n in enumerate(nodes)))


def _split_replies(name: str, requests: list[SplitRequest], reply: Message) -> list[SplitReply]:
    total = sum(len(r.rows) for r in requests)
    packed = m.get_array(reply, "left", np.uint8, 1)
    if len(packed) != (total + 7) // 8:
        raise FederationError(f"silo {name!r} returned a partition of the wrong size")
    left = np.unpackbits(packed, count=total).astype(bool)
    cut = m.split_batches(left, np.array([len(r.rows) for r in requests], dtype=np.int64))
    return [SplitReply(silo=name, tree=r.tree, node=r.node, left=part)
            for r, part in zip(requests, cut, strict=True)]


# ---- training ------------------------------------------------------------------------------


def shared_settings(cfg: AuthorityConfig) -> tuple[int, float, float]:
    """gbdt.trees, gbdt.lr, gbdt.reg_lambda: unset in a GbdtConfig of its own, filled in by
    mode when AuthorityConfig is built (server/config.py GBDT_DEFAULTS)."""
    g = cfg.gbdt
    if g.trees is None or g.lr is None or g.reg_lambda is None:
        raise ConfigError("gbdt.trees, gbdt.lr and gbdt.reg_lambda were not resolved")
    return g.trees, g.lr, g.reg_lambda


def depth_of(cfg: AuthorityConfig) -> int:
    """gbdt.depth, filled in by mode like shared_settings' keys."""
    if cfg.gbdt.depth is None:
        raise ConfigError("gbdt.depth was not resolved")
    return cfg.gbdt.depth


def params_of(cfg: AuthorityConfig) -> gbdt.GbdtParams:
    g = cfg.gbdt
    trees, lr, reg_lambda = shared_settings(cfg)
    if g.min_child_weight is None or g.binning not in ("quantile", "uniform"):
        raise ConfigError("gbdt.min_child_weight and gbdt.binning were not resolved")
    binning: Literal["quantile", "uniform"] = "quantile" if g.binning == "quantile" else "uniform"
    # server/gbdt.py's "plain" means g, h travel as numbers; under rr they are the randomised
    # labels' gradients, which is what makes them safe to send.
    return gbdt.GbdtParams(trees=trees, depth=depth_of(cfg), bins=g.bins, lr=lr,
                           lambda_=reg_lambda, min_child_weight=g.min_child_weight,
                           binning=binning)


def start(fed: Federation, run_key: str, bins: int, train: np.ndarray,
          units: float | None = None, binning: str | None = None) -> dict[str, int]:
    """Every silo builds its binned matrix over the training positions (x / units, by default
    STANDARD_UNITS; binned equal width, or by its own quantiles of those rows with
    binning="quantile"); returns their widths."""
    config: dict[str, str | int | float] = {"run": run_key, "bins": bins}
    if units is not None:
        config["units"] = units
    if binning is not None:
        config["binning"] = binning
    content = m.make_content(config, positions=train.astype(np.int64))
    replies = fed.broadcast(START, content)
    return {s: m.config_int(m.get_config(r), "features") for s, r in replies.items()}


def rr_gradients(margin: np.ndarray, y_view: np.ndarray, rho: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """g, h the silos see: logistic loss on clean labels when rho = 0 (exactly server/gbdt.py's
    `gradients`), else the forward-corrected loss on the randomised labels (label_dp.py) with
    its expected hessian q'^2 / (q (1 - q)), q = rho + (1 - 2 rho) sigmoid(margin): positive,
    and p (1 - p) at rho = 0. Either is a function of the margin and the RR labels only."""
    if rho == 0.0:
        return gbdt.gradients(margin, y_view)
    s = 0.5 * (1 + np.tanh(0.5 * margin))
    q = np.clip(rho + (1 - 2 * rho) * s, 1e-12, 1 - 1e-12)
    dq = (1 - 2 * rho) * s * (1 - s)
    return corrected_gradient(margin, y_view, rho), dq * dq / (q * (1 - q))


def base_margin(y_view: np.ndarray, rho: float) -> float:
    """Boost from the average: the clean default rate estimated from the RR labels,
    (mean - rho) / (1 - 2 rho); the plain training log-odds when rho = 0."""
    rate = (float(np.mean(y_view)) - rho) / (1 - 2 * rho)
    rate = float(np.clip(rate, 1e-6, 1 - 1e-6))
    return float(np.log(rate / (1 - rate)))


@dataclass(frozen=True)
class Fitted:
    model: gbdt.Model
    # Per tree: g, h of the training rows it was grown on (attribution needs node values).
    grads: tuple[tuple[np.ndarray, np.ndarray], ...]


def fit(silos: Mapping[str, gbdt.SiloEndpoint], y_view: np.ndarray, rho: float,
        params: gbdt.GbdtParams) -> Fitted:
    """`params.trees` trees over the silos' columns on the training rows' RR labels."""
    y_view = np.asarray(y_view, dtype=np.float64)
    base = base_margin(y_view, rho)
    margin = np.full(len(y_view), base)
    trees, grads = [], []
    for t in range(params.trees):
        g, h = rr_gradients(margin, y_view, rho)
        tree, values = gbdt.grow_tree(silos, g, h, t, params)
        margin += values
        trees.append(tree)
        grads.append((g.astype(np.float32), h.astype(np.float32)))
        log.debug("tree %d: %d splits, %d leaves", t, len(tree.splits), len(tree.leaves))
    return Fitted(gbdt.Model(params=params, base_margin=base, trees=tuple(trees)), tuple(grads))


# ---- scoring -------------------------------------------------------------------------------


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


def leaf_positions(tree: gbdt.Tree, t: int, bits: Bits, rows: int,
                   credit: tuple[dict[int, float], dict[str, np.ndarray]] | None = None
                   ) -> np.ndarray:
    """Each person's leaf (heap index) in tree `t`: children have larger heap indices than
    their parent, so one pass in order routes all (as `gbdt.predict_trees` does). With
    `credit` (node values, per-silo contributions), each step down a split adds the change of
    node value to the contribution of the silo owning the split."""
    position = np.zeros(rows, dtype=np.int64)
    for n in sorted(tree.splits):
        at = position == n
        left = bits[(t, n)][at]
        position[at] = np.where(left, 2 * n + 1, 2 * n + 2)
        if credit is not None:
            values, contrib = credit
            step = np.where(left, values[2 * n + 1], values[2 * n + 2]) - values[n]
            contrib[tree.splits[n].silo][at] += step
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


def score(fitted: Fitted, bits: Bits, rows: int, train: np.ndarray, val: np.ndarray,
          y: np.ndarray) -> Scored:
    """Margins of the routed people, with each silo's contribution: along each person's path
    in every tree, the change in node value at a split is credited to the silo owning the
    split, so margin = bias + the silos' contributions exactly. Validation AUC is recorded at
    HISTORY_POINTS tree counts (y: clean labels of the routed people)."""
    model = fitted.model
    margin = np.full(rows, model.base_margin)
    bias = model.base_margin
    contrib = {s.silo: np.zeros(rows) for t in model.trees for s in t.splits.values()}
    every = max(1, len(model.trees) // HISTORY_POINTS)
    history, t0 = [], time.perf_counter()
    for t, tree in enumerate(model.trees):
        leaf = leaf_positions(tree, t, bits, rows)
        values = node_values(tree, leaf[train], *fitted.grads[t], model.params)
        bias += values[0]
        leaf_positions(tree, t, bits, rows, credit=(values, contrib))
        table = np.zeros(max(tree.leaves) + 1)
        table[list(tree.leaves)] = list(tree.leaves.values())
        margin += table[leaf]
        if (t + 1) % every == 0 or t + 1 == len(model.trees):
            history.append(history_row(margin[val], y[val], t + 1, t0))
    return Scored(margin, bias, contrib, history)


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


# ---- the phase -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeJob:
    fed: Federation
    cfg: AuthorityConfig
    run_key: str
    train: np.ndarray
    val: np.ndarray
    n_positions: int
    y: np.ndarray  # clean labels of every aligned position (calibration, history)
    y_view: np.ndarray  # the labels gradients may see (RR on training positions)


def train_and_calibrate(job: TreeJob, phases: run_phases.PhaseTimer
                        ) -> tuple[TrainResult, scoring.Platt]:
    """Grow the trees over Flower, then (timed as `score`) route everyone and calibrate on
    validation people's clean labels, as the MLP run without DP-SGD does."""
    refuse_unwired(job.cfg)
    params = params_of(job.cfg)
    rho = flip_probability(job.cfg.privacy.label_epsilon)
    everyone = np.arange(job.n_positions, dtype=np.int64)
    features = start(job.fed, job.run_key, params.bins, job.train, binning=params.binning)
    silos = FlowerSilos(job.fed, features, route_positions=everyone)
    t0 = time.perf_counter()
    fitted = fit(silos, job.y_view[job.train], rho, params)
    log.info("%d trees in %.1f s, %d round trips", params.trees, time.perf_counter() - t0,
             silos.round_trips + 1)
    phases.start("score")
    bits = route(fitted.model, silos)
    y = job.y.astype(np.float64)
    kept, curve = keep_best(fitted, bits, job.val, y)
    log.info("kept %d of %d trees (best validation log loss)", len(kept.model.trees),
             params.trees)
    scored = score(kept, bits, job.n_positions, job.train, job.val, y)
    calibrate = scoring.Platt.fit(scored.margins[job.val], job.y[job.val])
    result = TrainResult(
        bias=scored.bias, logits=scored.margins, history=curve,
        round_trips=silos.round_trips + 1, steps=0,
        silo_seconds={s: round(v, 3) for s, v in silos.silo_seconds.items()},
        contributions={s: contribution_summary(v) for s, v in scored.contributions.items()})
    return result, calibrate


def annotate(out: dict, cfg: AuthorityConfig) -> None:
    """authority.json for a tree run (nothing for an MLP run): what the model is, that its
    epsilon is infinite, and what the authority saw of the silos."""
    if cfg.model.kind != "gbdt":
        return
    out["model"] = {**out["model"], "kind": "gbdt", "reasons": 0}
    out["model_kind"] = "gbdt"
    kept = [row["trees"] for row in out.get("history", []) if row.get("kept")]
    out["gbdt"] = {
        **{k: getattr(cfg.gbdt, k) for k in ("trees", "depth", "bins", "binning", "lr",
                                              "reg_lambda", "min_child_weight", "protection")},
        # The model keeps this many of the trees grown: the best validation log loss.
        "trees_kept": kept[0] if kept else cfg.gbdt.trees,
        # The silos bin their prepared matrix divided by this (clients/protocol/gbdt.py).
        "input_scale": STANDARD_UNITS,
        "model_epsilon": "inf",
        "model_note": ("the trees (splits, leaf values) and the scores are released without "
                       "differential privacy: eps_model is infinite (privacy.epsilon=inf)"),
        "label_protection": (f"randomised response at privacy.label_epsilon="
                             f"{cfg.privacy.label_epsilon:g}: the silos' g, h are "
                             "post-processing of the RR labels"
                             if cfg.privacy.label_dp else
                             "none: privacy.label_epsilon=inf, the silos can read every "
                             "training label from the sign of g"),
        "reasons": ("none yet for trees: per-silo points in `contributions` credit each "
                    "split's change of node value along a person's path to the split's silo"),
    }
    out["authority_sees"] = [
        "per node of every tree, each silo's per-(feature, bin) sums of g and h",
        "each split's (silo, feature index, bin), never the silo's threshold"
        + (" (with gbdt.binning=quantile the bin is a rank: about the share of training people "
           "at or below the threshold in that silo's column)"
           if cfg.gbdt.binning == "quantile" else ""),
        "the left/right partition of the training rows at every split",
        "every person's left/right bit at each silo's splits (scoring)",
    ]
