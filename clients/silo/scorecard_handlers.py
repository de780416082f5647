"""The silo's messages of the vertical WoE scorecard (`model.kind=scorecard`; the protocol in
clients/protocol/scorecard.py, the answers in clients/silo/scorecard.py `ScorecardSilo`).

The run starts with the trees' `query.gbdt_start` (run key, pre-bins, training positions) and
the label-dependent sums travel on the trees' `train.gbdt_level`, root node only
(clients/silo/gbdt_handlers.py): the scorecard adds three messages.

  train.scorecard_woe     the silo's merged bins (cuts on its own pre-bins) and their WoE
  train.scorecard_logits  one coefficient per feature -> per training row its partial logit
  query.scorecard_score   coefficients + aligned positions [+ points per bin, reasons k]
                          -> per position its partial logit; with the points the silo writes
                          its `scorecard.csv` (<silo dir>/scorecards/<run>/) and returns its
                          reason codes in logit units (clients/silo/explain.py's format)

What the silo keeps between messages lives in the node's Flower state (`scorecard`: the WoE
tables), so any worker process can answer; the `ScorecardSilo`s over the training positions
and over the scored positions are derived from the prepared table and cached per process.
The bins' ranges in the silo's own units stay here, in its table file.

Each message is answered only in a run announced as a non-private scorecard
(clients/silo/run_checks.py), and reason codes only within the silo's policy (`explain`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message

from clients.node import Node
from clients.protocol import messages as m
from clients.protocol.reasons import MAX_REASONS
from clients.protocol.scorecard import (
    LOGITS,
    SCORE,
    TABLE_FILE,
    WOE,
    FeatureWoe,
    PartialLogitsRequest,
    PointsTables,
    WoeTables,
    pack_tables,
    unpack_tables,
)
from clients.silo import kept_state, run_checks
from clients.silo.gbdt_handlers import bins_and_units, refused_as_protocol_errors, tree_inputs
from clients.silo.registry import handlers
from clients.silo.scorecard import ScorecardSilo, raw_units
from clients.silo.state import rows_at, silo_dir, silo_matrix, silo_name, silo_policy
from crypto.secret_random import digest

STATE = kept_state.WOE_STATE  # node state: the WoE tables as packed arrays (cuts, sizes, woe)
RUN = kept_state.WOE_RUN  # node state: the run they belong to (a later gbdt_start drops them)


@handlers.train(WOE.removeprefix("train."))
def woe(msg: Message, node: Node) -> Message:
    """Keep the merged bins the authority chose (checked against the silo's features and
    pre-bins before they are kept)."""
    t0 = time.perf_counter()
    run_checks.check_request(node, WOE)
    packed = {k: m.get_array(msg, k, dtype, 1) for k, dtype in
              (("cuts", np.int64), ("sizes", np.int64), ("woe", np.float64))}
    with refused_as_protocol_errors():
        tables = unpack_tables(packed["cuts"], packed["sizes"], packed["woe"])
        _silo(node, _positions(node), tables, "train")  # checks the tables fit
    node.state[STATE] = m.arrays(**packed)
    node.state[RUN] = ConfigRecord({"run": _run(node)})
    kept_state.keep_woe(node, _run(node), packed)  # to score after the run
    return Message(m.make_content({"seconds": time.perf_counter() - t0}), reply_to=msg)


@handlers.train(LOGITS.removeprefix("train."))
def logits(msg: Message, node: Node) -> Message:
    """Per training row, sum_f weights[f] * WoE_f(bin of the row)."""
    t0 = time.perf_counter()
    run_checks.check_request(node, LOGITS)
    round_ = m.config_int(m.get_config(msg), "round")
    weights = m.get_array(msg, "weights", np.float64, 1)  # refuses NaN and infinities
    silo = _silo(node, _positions(node), _held_tables(node), "train")
    with refused_as_protocol_errors():
        reply = silo.partial_logits(PartialLogitsRequest(round=round_, weights=weights))
    return Message(m.make_content({"round": round_, "seconds": time.perf_counter() - t0},
                                  logits=reply.logits), reply_to=msg)


@handlers.query(SCORE.removeprefix("query."))
def score(msg: Message, node: Node) -> Message:
    """Scoring: the partial logits of the given aligned positions; with the points per bin,
    the silo's table written to its own directory and, for `reasons` > 0, its reason codes."""
    t0 = time.perf_counter()
    run_checks.check_request(node, SCORE)
    cfg = m.get_config(msg)
    k = m.config_int(cfg, "reasons") if "reasons" in cfg else 0
    if k > 0:  # before anything is computed or written
        silo_policy(node).check_explain(k)
    positions = m.get_array(msg, "positions", np.int64, 1)
    weights = m.get_array(msg, "weights", np.float64, 1)
    silo = _silo(node, positions, _held_tables(node), "score")
    with refused_as_protocol_errors():
        reply = silo.partial_logits(PartialLogitsRequest(round=0, weights=weights))
    arrays: dict[str, np.ndarray] = {"logits": reply.logits}
    config: dict[str, object] = {}
    points = m.get_array(msg, "points", np.float64, 1, required=False)
    if points is not None:
        sizes = np.cumsum(silo.merged_bins())
        if len(points) != (sizes[-1] if len(sizes) else 0):
            raise m.ProtocolError("points: one value per merged bin")
        with refused_as_protocol_errors():
            silo.points_tables(PointsTables(points=tuple(np.split(points, sizes[:-1]))))
        silo.write_table(table_path(node))
    # Reasons with the points (the end of the run) or without them (scoring after the run,
    # `fedscore score` / `dispute`: the table stays as the run wrote it).
    if not 0 <= k <= MAX_REASONS:
        raise m.ProtocolError(f"reasons must lie in [0, {MAX_REASONS}]")
    if k:
        delta, index, share, reference = silo.explain(weights, k)
        arrays |= {"explain_delta": delta.astype(np.float32),
                   "reason_index": index.astype(np.int16),
                   "reason_share": share.astype(np.float32)}
        config |= {"explain.reference": reference, "explain.features": silo.columns}
    return Message(m.make_content({**config, "seconds": time.perf_counter() - t0}, **arrays),
                   reply_to=msg)


def table_path(node: Node) -> Path:
    """Where the silo keeps the run's points table: in its own directory, never sent."""
    return silo_dir(node) / "scorecards" / _run(node) / TABLE_FILE


def _positions(node: Node) -> np.ndarray:
    _run(node)
    return m.array_record(node.state, "gbdt_rows")["positions"].numpy()


def _run(node: Node) -> str:
    if "gbdt" not in node.state:
        raise m.ProtocolError("no scorecard yet: the authority must send query.gbdt_start first")
    return str(m.config_record(node.state, "gbdt")["run"])  # checked alphanumeric at start


def _held_tables(node: Node) -> tuple[FeatureWoe, ...]:
    if (STATE not in node.state or RUN not in node.state
            or m.config_record(node.state, RUN)["run"] != _run(node)):
        raise m.ProtocolError(f"no WoE tables for this run yet: the authority must send {WOE} "
                              "first")
    held = m.array_record(node.state, STATE)
    return unpack_tables(held["cuts"].numpy(), held["sizes"].numpy(), held["woe"].numpy())


def _silo(node: Node, positions: np.ndarray, tables: tuple[FeatureWoe, ...], role: str
          ) -> ScorecardSilo:
    """The run's `ScorecardSilo` over `positions` holding `tables`, cached per process and
    role (training rows, scored positions): rebuilt when the table, positions or bins
    change."""
    run = _run(node)
    bins, units = bins_and_units(node)
    matrix = silo_matrix(node)
    packed = pack_tables(tables)

    def build() -> ScorecardSilo:
        x = tree_inputs(matrix.x[rows_at(node.context, positions)], units)
        to_raw = raw_units(matrix.prep) if matrix.prep is not None else None
        silo = ScorecardSilo(silo_name(node), x, bins=bins, columns=matrix.columns,
                             to_raw=to_raw, units=units)
        with refused_as_protocol_errors():
            silo.woe_tables(WoeTables(features=tables))
        return silo

    identity = ("scorecard", role, str(silo_dir(node).resolve()), run)
    version = (id(matrix), bins, units, digest(positions),
               *(digest(a) for a in packed.values()))
    return node.tables.get(identity, version, build)
