"""The silos as the authority's tree code addresses them, over Flower messages (`model.kind=gbdt`
and the trees behind the DP trees and the scorecard); clients/silo/gbdt_handlers.py answers.

Per tree, per level, two round trips with every silo at once: the level's histogram request
(with the tree's g, h on its root) to every silo, then the chosen splits' partitions from the
silos that own them, all of a silo's nodes in one message; never one message per node or row.
Scoring routes every aligned person through each silo's own splits (one message per silo).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from clients.protocol import messages as m
from clients.protocol.gbdt import (
    LEVEL,
    ROUTE,
    SPLIT,
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
from server.config import ConfigError
from server.federation import Federation, FederationError


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


def start(fed: Federation, run_key: str, bins: int, train: np.ndarray,
          units: float | None = None, binning: str | None = None,
          trees: int | None = None, depth: int | None = None) -> dict[str, int]:
    """Every silo builds its binned matrix over the training positions (x / units, by default
    STANDARD_UNITS; binned equal width, or by its own quantiles of those rows with
    binning="quantile"); returns their widths. The SecureBoost trees announce their `trees`
    and `depth`: each silo answers no more trees, nodes and partitions than those allow
    (clients/silo/tree_caps.py)."""
    config: dict[str, str | int | float] = {"run": run_key, "bins": bins}
    if trees is not None and depth is not None:
        config.update(trees=trees, depth=depth)
    if units is not None:
        config["units"] = units
    if binning is not None:
        config["binning"] = binning
    content = m.make_content(config, positions=train.astype(np.int64))
    replies = fed.broadcast(START, content)
    return {s: m.config_int(m.get_config(r), "features") for s, r in replies.items()}
