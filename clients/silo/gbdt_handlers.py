"""The silo's messages of vertical gradient-boosted trees (`model.kind=gbdt`; the protocol in
clients/protocol/gbdt.py, the answers in clients/silo/gbdt.py `GbdtSilo`).

  query.gbdt_start   run key, bins, [units], [binning], training positions
                     -> the silo's feature count
  train.gbdt_level   [g, h of a new tree] + the level's open nodes and their rows
                     -> per node, per-(feature, bin) sums of g and h
  train.gbdt_split   the level's chosen splits this silo owns (feature, bin, node rows)
                     -> one left/right bit per row of each node
  query.gbdt_route   the silo's splits of the model + positions -> their bits (scoring)
  query.gbdt_explain reason codes k -> the silo's consent (its policy `explain` allows k)
                     and its feature names, with the feature of each of its columns

What the silo keeps between messages lives in the node's Flower state (`gbdt`: the run, its
bins and training positions; `gbdt_grad`: the current tree's g, h), so any worker process can
answer; its binned matrix (`GbdtSilo`, built from the same prepared matrix and aligned rows as
the MLP's) is derived from the table and cached per process. Thresholds stay here: a request
names the silo's own column index and a bin, never a value. Rows in the training messages are
indices into the training positions the authority sent with `query.gbdt_start`. With
binning="quantile" the silo bins each column at its own quantiles over those training
positions (clients/silo/gbdt.py `Binning`): the edges, like every threshold, never leave it.

Before answering, each handler checks the run's mode as announced with `query.align` and
pinned by the silo (clients/silo/run_checks.py: the start must name the announced run key; a
DP run gets uniform bins and routing only, never SecureBoost's histograms or partitions) and
the silo's policy (`min_group` over the training positions and over each node's rows), and,
in a SecureBoost run, the trees and depth its start announced (clients/silo/tree_caps.py: each
tree once, sums and partitions only of nodes the silo can place, over their own rows).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from flwr.app import ConfigRecord, Message

from clients.node import Node
from clients.protocol import messages as m
from clients.protocol.gbdt import (
    EXPLAIN,
    LEVEL,
    ROUTE,
    SPLIT,
    STANDARD_UNITS,
    START,
    Gradients,
    HistogramRequest,
    NodeHistogram,
    NodeRows,
    SplitRequest,
)
from clients.protocol.reasons import MAX_REASONS, feature_groups
from clients.protocol.run_mode import RunMode
from clients.silo import kept_state, run_checks, tree_caps
from clients.silo.explain import features_of
from clients.silo.gbdt import BINNINGS, MAX_BINS, Binning, GbdtSilo
from clients.silo.registry import handlers
from clients.silo.state import rows_at, silo_dir, silo_matrix, silo_name, silo_policy
from crypto.secret_random import digest


@handlers.query(START.removeprefix("query."))
def start(msg: Message, node: Node) -> Message:
    """Start a run's trees on the training positions the authority names."""
    cfg = m.get_config(msg)
    run, bins = str(cfg.get("run", "")), m.config_int(cfg, "bins")
    if not run.isalnum():
        raise m.ProtocolError("malformed run key")
    if not 2 <= bins <= MAX_BINS:
        raise m.ProtocolError(f"bins must lie in [2, {MAX_BINS}]")
    try:
        units = float(cfg.get("units", STANDARD_UNITS))
    except (TypeError, ValueError):
        raise m.ProtocolError("units must be a number") from None
    if not 0.1 <= units <= 100:  # also refuses nan and inf
        raise m.ProtocolError("units must lie in [0.1, 100]")
    binning = str(cfg.get("binning", "uniform"))
    if binning not in BINNINGS:
        raise m.ProtocolError(f"binning must be one of {', '.join(BINNINGS)}")
    if "align" not in node.state:
        raise m.ProtocolError("no alignment yet: the authority must send query.align first")
    mode = run_checks.check_tree_start(node, run, binning)
    if mode.kind == "gbdt" and not mode.private:  # SecureBoost: its trees bound its answers
        tree_caps.announce(node, run, cfg)
    positions = m.get_array(msg, "positions", np.int64, 1)
    if len(np.unique(positions)) != len(positions):
        raise m.ProtocolError("the training positions name one position twice")
    rows_at(node.context, positions)  # every position must be this silo's
    # Every bin edge (quantile), histogram and partial logit of the run is over these people.
    silo_policy(node).check_people("the training positions", positions)
    node.state["gbdt"] = ConfigRecord({"run": run, "bins": bins, "units": units,
                                       "binning": binning, "tree": -1})
    node.state["gbdt_rows"] = m.arrays(positions=positions)
    # A resumed run's edges are not this start's.
    for held in ("gbdt_grad", tree_caps.KNOWN, tree_caps.NODES, kept_state.EDGES):
        if held in node.state:
            del node.state[held]
    silo = _silo(node)
    kept_state.keep_start(node, silo.binning)  # to score after the run (a new session)
    return Message(m.make_content({"features": silo.features}), reply_to=msg)


@handlers.train(LEVEL.removeprefix("train."))
def level(msg: Message, node: Node) -> Message:
    """One tree level: take the tree's g, h when they come (with its root), then the sums of
    every open node the authority asks for."""
    t0 = time.perf_counter()
    mode = run_checks.check_request(node, LEVEL)
    cfg = m.get_config(msg)
    tree = m.config_int(cfg, "tree")
    silo = _silo(node)
    nodes = m.get_array(msg, "nodes", np.int64, 1)
    groups = _groups(msg, len(nodes), silo.rows)
    _check_level(node, mode, nodes, groups, silo.rows)
    g = m.get_array(msg, "g", np.float64, 1, required=False)
    if g is not None:
        h = m.get_array(msg, "h", np.float64, 1)
        with refused_as_protocol_errors():
            silo.gradients(Gradients(tree=tree, g=g, h=h))  # checks one value per row
    elif (m.config_int(m.config_record(node.state, "gbdt"), "tree") != tree
          or "gbdt_grad" not in node.state):
        raise m.ProtocolError(f"no gradients for tree {tree}")
    if mode.kind == "gbdt":  # SecureBoost: trees and nodes within what was announced
        tree_caps.check_level(node, _run(node), tree, g is not None, nodes, groups, silo.rows)
    if g is not None:
        node.state["gbdt_grad"] = m.arrays(g=g, h=h)
        m.config_record(node.state, "gbdt")["tree"] = tree
    else:
        held = m.array_record(node.state, "gbdt_grad")
        silo.gradients(Gradients(tree=tree, g=held["g"].numpy(), h=held["h"].numpy()))
    request = HistogramRequest(tree=tree, nodes=tuple(
        NodeRows(node=int(n), rows=r) for n, r in zip(nodes, groups, strict=True)))
    with refused_as_protocol_errors():
        reply = silo.histograms(request)
    sums = [s for s in reply.nodes if isinstance(s, NodeHistogram)]
    content = m.make_content(
        {"tree": tree, "seconds": time.perf_counter() - t0},
        nodes=np.array([s.node for s in sums], dtype=np.int64),
        g=np.stack([s.g for s in sums]), h=np.stack([s.h for s in sums]))
    return Message(content, reply_to=msg)


@handlers.train(SPLIT.removeprefix("train."))
def split(msg: Message, node: Node) -> Message:
    """The left/right bits of the rows of each node this silo's splits cut."""
    t0 = time.perf_counter()
    run_checks.check_request(node, SPLIT)
    silo = _silo(node)
    nodes = m.get_array(msg, "nodes", np.int64, 1)
    features = m.get_array(msg, "features", np.int64, 1)
    bins = m.get_array(msg, "bins", np.int64, 1)
    if not len(nodes) == len(features) == len(bins):
        raise m.ProtocolError("nodes, features and bins differ in length")
    groups = _groups(msg, len(nodes), silo.rows)
    policy = silo_policy(node)
    for n, rows in zip(nodes, groups, strict=True):  # one bit per row: the node's partition
        policy.check_people(f"the partition of node {int(n)}", rows)
    tree = m.config_int(m.get_config(msg), "tree")
    lefts = []
    for n, feature, bin_, rows in zip(nodes, features, bins, groups, strict=True):
        with refused_as_protocol_errors():
            lefts.append(silo.split(SplitRequest(tree=tree, node=int(n), feature=int(feature),
                                                 bin=int(bin_), rows=rows)).left)
    # Checked once the request is well formed (its features and bins), before any bit leaves.
    tree_caps.check_split(node, _run(node), tree, nodes, groups, lefts)
    left = np.concatenate(lefts) if lefts else np.zeros(0, dtype=bool)
    content = m.make_content({"tree": tree, "seconds": time.perf_counter() - t0}, nodes=nodes,
                             left=np.packbits(left))
    return Message(content, reply_to=msg)


@handlers.query(ROUTE.removeprefix("query."))
def route(msg: Message, node: Node) -> Message:
    """Scoring: the bits of the silo's splits (feature, bin pairs) for the given positions,
    packed 8 to a byte along the positions."""
    t0 = time.perf_counter()
    run_checks.check_request(node, ROUTE)
    if "gbdt" not in node.state:
        raise m.ProtocolError("no trees yet: the authority must send query.gbdt_start first")
    bins, units = bins_and_units(node)
    # The training positions' edges, kept in the silo: after the run, the run's own (kept on
    # disk at the start), whatever corrections changed since in the training people's rows.
    binning = kept_state.held_binning(node, bins) or _silo(node).binning
    features = m.get_array(msg, "features", np.int64, 1)
    split_bins = m.get_array(msg, "bins", np.int64, 1)
    positions = m.get_array(msg, "positions", np.int64, 1)
    if len(features) != len(split_bins):
        raise m.ProtocolError("features and bins differ in length")
    binned = binning.apply(tree_inputs(silo_matrix(node).x[rows_at(node.context, positions)],
                                       units))
    left = np.zeros((len(features), len(positions)), dtype=bool)
    for i, (feature, bin_) in enumerate(zip(features, split_bins, strict=True)):
        if not (0 <= feature < binned.shape[1] and 0 <= bin_ < bins - 1):
            raise m.ProtocolError("split outside this silo's features or bins")
        left[i] = binned[:, feature] <= bin_
    return Message(m.make_content({"seconds": time.perf_counter() - t0},
                                  left=np.packbits(left, axis=1)), reply_to=msg)


@handlers.query(EXPLAIN.removeprefix("query."))
def explain(msg: Message, node: Node) -> Message:
    """Consent to `reasons` reason codes per person from the trees' splits on this silo's
    columns, within the silo's policy (`explain`): beyond it, a request the authority marks
    `required` (the run's explain.reasons asked them) is refused, an optional one declined
    (`consent` 0, nothing else). With consent, the reply names the silo's features and the
    feature of each column (the trees split columns: a feature's missing indicator and
    one-hot columns count as the feature). No data: the names are the schema's."""
    t0 = time.perf_counter()
    run_checks.check_request(node, EXPLAIN)
    cfg = m.get_config(msg)
    k = m.config_int(cfg, "reasons")
    if not 1 <= k <= MAX_REASONS:
        raise m.ProtocolError(f"reasons must lie in [1, {MAX_REASONS}]")
    policy = silo_policy(node)
    if k > policy.explain and not cfg.get("required", True):
        return Message(m.make_content({"consent": 0, "seconds": time.perf_counter() - t0}),
                       reply_to=msg)
    policy.check_explain(k)
    matrix = silo_matrix(node)
    features = features_of(matrix)
    column_feature = np.zeros(len(matrix.columns), dtype=np.int64)
    for f, columns in enumerate(feature_groups(matrix.columns, features)):
        column_feature[columns] = f
    return Message(m.make_content({"consent": k, "explain.features": features,
                                   "seconds": time.perf_counter() - t0},
                                  columns=column_feature), reply_to=msg)


def tree_inputs(x: np.ndarray, units: float = STANDARD_UNITS) -> np.ndarray:
    """What the trees bin: the prepared matrix in `units` standard units, STANDARD_UNITS (see
    there) unless query.gbdt_start names others (the DP trees: DP_UNITS)."""
    return np.asarray(x, dtype=np.float64) / units


def bins_and_units(node: Node) -> tuple[int, float]:
    """The run's bins and units (units absent from a state written before they existed)."""
    cfg = m.config_record(node.state, "gbdt")
    return m.config_int(cfg, "bins"), float(cfg.get("units", STANDARD_UNITS))  # type: ignore[arg-type]


def _run(node: Node) -> str:
    """The run key of the trees' start."""
    return str(m.config_record(node.state, "gbdt")["run"])


def _silo(node: Node) -> GbdtSilo:
    """The run's `GbdtSilo` over its training positions, cached per process (derived from the
    prepared table and the state's positions, cheap to rebuild)."""
    if "gbdt" not in node.state:
        raise m.ProtocolError("no trees yet: the authority must send query.gbdt_start first")
    cfg = m.config_record(node.state, "gbdt")
    positions = m.array_record(node.state, "gbdt_rows")["positions"].numpy()
    run, (bins, units) = str(cfg["run"]), bins_and_units(node)
    kind = str(cfg.get("binning", "uniform"))  # absent from a state written before it existed
    matrix = silo_matrix(node)

    def build() -> GbdtSilo:
        x = tree_inputs(matrix.x[rows_at(node.context, positions)], units)
        return GbdtSilo(silo_name(node), x, bins=bins, binning=Binning.fit(x, bins, kind))

    identity = ("gbdt", str(silo_dir(node).resolve()), run)
    version = (id(matrix), bins, units, kind, digest(positions))
    return node.tables.get(identity, version, build)


def _check_level(node: Node, mode: RunMode, nodes: np.ndarray, groups: list[np.ndarray],
                 rows: int) -> None:
    """A level's sums are aggregates over each node's rows: each over at least min_group
    distinct people. A scorecard run asks the root's only (every training row): per-node sums
    over subsets the authority picks are the trees' disclosure, not the scorecard's."""
    if mode.kind == "scorecard" and not (
            len(nodes) == 1 and nodes[0] == 0 and np.array_equal(groups[0], np.arange(rows))):
        raise run_checks.RunModeRefusalError(
            f"{LEVEL} in a model.kind=scorecard run asks the root node over every training "
            "row, nothing else")
    policy = silo_policy(node)
    for n, group in zip(nodes, groups, strict=True):
        policy.check_people(f"the per-bin sums of node {int(n)}", group)


def _groups(msg: Message, count: int, rows: int) -> list[np.ndarray]:
    """The rows of each of `count` nodes: `rows` concatenated, cut by `sizes`; each group
    ascending, within the silo's training rows."""
    flat = m.get_array(msg, "rows", np.int64, 1)
    sizes = m.get_array(msg, "sizes", np.int64, 1)
    if len(sizes) != count or (sizes < 0).any():
        raise m.ProtocolError("one row count per node is needed")
    if len(flat) and (flat.min() < 0 or flat.max() >= rows):
        raise m.ProtocolError(f"rows outside 0..{rows - 1}")
    return m.split_batches(flat, sizes) if count else []


@contextmanager
def refused_as_protocol_errors() -> Iterator[None]:
    """`GbdtSilo`'s checks (wrong row counts, a split outside its features or bins) answered
    as protocol errors naming the silo, not as a failed message."""
    try:
        yield
    except m.ProtocolError:
        raise
    except ValueError as exc:
        raise m.ProtocolError(str(exc)) from None
