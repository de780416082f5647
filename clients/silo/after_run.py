"""The silo's messages after a run, at the restored model: `query.score` (contributions for
the silo's current records or a later cohort's, with reason codes and drift when asked) and
`query.correct` (a disputed field's corrected value, checked and recorded).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message

from clients.node import Node
from clients.protocol import messages as m
from clients.silo import corrections, run_checks
from clients.silo.cohorts import load_cohort
from clients.silo.data import SiloMatrix
from clients.silo.drift import psi
from clients.silo.explain import features_of
from clients.silo.registry import handlers
from clients.silo.state import (
    reply_digest,
    rows_at,
    silo_dir,
    silo_journal,
    silo_matrix,
    silo_name,
    silo_policy,
    silo_store,
    silo_trainer,
)
from clients.silo.training import explained, masked
from crypto.masking import clip_contribution
from crypto.secret_random import digest

if TYPE_CHECKING:
    from clients.silo.trainer import SiloTrainer


@handlers.query("correct")
def correct(msg: Message, node: Node) -> Message:
    """Record a disputed field's corrected value for the person at one position."""
    cfg = m.get_config(msg)
    position = m.get_array(msg, "position", np.int64, 1)
    if len(position) != 1:
        raise m.ProtocolError("a correction names exactly one position")
    silo_policy(node).check_correction(str(cfg["field"]))
    data = silo_matrix(node)
    silo = silo_name(node)
    row = int(rows_at(node.context, position)[0])

    texts = [c for c, _ in data.prep.texts] if data.prep is not None else []
    value = corrections.check_value(silo, str(cfg["field"]), cfg["value"], features_of(data),
                                    texts)
    held = corrections.record(silo_dir(node), silo,
                              silo_store(node), str(data.ids.iloc[row]),
                              str(cfg["field"]), value, str(cfg.get("category", "")))
    return Message(m.make_content({"corrections": held}), reply_to=msg)


@handlers.query("score")
def score(msg: Message, node: Node) -> Message:
    """Contributions for positions at the restored model: the silo's current records (its
    corrections applied), or a later cohort's (`cohort`), with reason codes when asked and,
    with `drift`, the population stability index of the silo's points against its
    contributions on the current records."""
    t0 = time.perf_counter()
    run_checks.check_request(node, m.SCORE)  # an MLP run's: the pinned kind, not the request's
    cfg = m.get_config(msg)
    request = str(cfg.get("request", ""))
    if not request.isalnum() or len(request) > 64:
        raise m.ProtocolError("a score request needs an alphanumeric request id")
    explain = int(cfg.get("explain", 0))
    if explain > 0:
        silo_policy(node).check_explain(explain)
    positions = m.get_array(msg, "positions", np.int64, 1)
    rows = rows_at(node.context, positions)
    trainer = silo_trainer(node)
    # Each request id is answered once, remembered across restarts: its masks are
    # single-use, and a repeat after a correction would release the difference.
    journal = silo_journal(node)
    binding = m.content_digest(msg.content)
    journal.check("score", request, binding, once=True)
    data = silo_matrix(node)
    cohort = str(cfg.get("cohort", ""))
    x = _cohort_rows(node, data, cohort)[rows] if cohort else data.x[rows]
    values = clip_contribution(trainer.released(x, "score", request, cohort,
                                                digest(positions)))
    reply: dict = _drift(trainer, data.x[rows], values) if cfg.get("drift") else {}
    out: dict[str, np.ndarray] = {}
    if bool(node.state["model"].get("secure", False)):
        out["contributions"] = masked(node, values, 0, f"score/{request}", binding)
    else:
        out["contributions"] = values
    if explain > 0:
        arrays, extra = explained(trainer, data, x, explain)
        out.update(arrays)
        reply.update(extra)
    reply["seconds"] = time.perf_counter() - t0
    content = m.make_content(reply, **out)
    journal.record("score", request, binding, reply_digest(content))
    return Message(content, reply_to=msg)


def _cohort_rows(node: Node, data: SiloMatrix, cohort: str) -> np.ndarray:
    """A later cohort's records of the silo's people, prepared as its table is."""
    return load_cohort(silo_dir(node), silo_name(node), cohort, silo_store(node), data)


def _drift(trainer: SiloTrainer, x: np.ndarray, values: np.ndarray) -> dict:
    """The population stability index of `values` against the contributions on `x`."""
    before = trainer.contributions(x)
    # Points fall as contributions rise: compare -g, so bins follow points' order.
    return {"drift.psi": psi(-before.astype(np.float64), -values.astype(np.float64))}
