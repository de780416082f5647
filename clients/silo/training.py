"""The silo's training step (`train.step`) and what it releases.

Each step applies the gradients the authority sent for the batches released last step,
checkpoints the round and releases contributions for the next batches and the evaluation group:
clipped, masked under secure aggregation, with the differentially private summary (one per
run) and reason codes when asked and the policy allows them. A step is answered once per round
(the journal); a re-sent step whose reply was lost is answered from the node's cache.
`FEDSCORE_SILO_FAULT` makes a silo misbehave on purpose, for tests.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.node import Node
from clients.protocol import messages as m
from clients.protocol.dp_constants import STATISTICS_NOISE_MULTIPLIER
from clients.silo import run_checks
from clients.silo.data import SiloMatrix
from clients.silo.explain import explain
from clients.silo.policy import SiloPolicy
from clients.silo.registry import handlers
from clients.silo.state import (
    Journal,
    RefusedError,
    reply_digest,
    rows_at,
    run_journal,
    save_round,
    save_trainer,
    silo_journal,
    silo_matrix,
    silo_name,
    silo_policy,
    silo_random,
    silo_trainer,
)
from crypto.masking import MaskingError, clip_contribution, mask_context, masked_share
from crypto.secret_random import digest

if TYPE_CHECKING:
    from clients.silo.trainer import SiloTrainer

log = logging.getLogger(__name__)


@handlers.train("step")
def step(msg: Message, node: Node) -> Message:
    """One training step: apply the gradients the authority sent for the batches released last
    step, checkpoint the round, and release contributions for the next batches (`plan`) and
    the evaluation group (`eval`); answered once per round, a lost reply from the cache."""
    t0 = time.perf_counter()
    config = m.get_config(msg)
    round_ = int(config.get("round", 0))
    if "model" not in node.state:
        raise m.ProtocolError("no model yet: the authority must send query.align first")
    # A tree or scorecard run announces an MLP spec without DP-SGD noise: never train on it.
    run_checks.check_request(node, m.STEP)
    # One answer per round, whatever happened since (resume, restart): a different message
    # for an answered round is refused before anything is computed.
    journal = silo_journal(node)
    binding = m.content_digest(msg.content)
    journal.check("step", round_, binding)
    _check_step_policy(msg, config, silo_policy(node))
    summary = _asks_summary(msg, config)
    if summary:
        _check_one_summary(run_journal(node), binding)
    repeated = _repeated_step(msg, node.context)
    if repeated is not None:
        return repeated
    x = silo_matrix(node).x
    trainer = silo_trainer(node)
    _select_epoch(msg, node, config, trainer)
    _apply_gradients(msg, node, trainer, x)
    if "round" in config:
        save_round(node, round_)
    out, reply_config = _step_releases(msg, node, trainer, x, round_, binding)
    if trainer.history:
        out["accountant"] = np.array(trainer.history, dtype=np.float64)
    # The journal holds what this silo computed and released; the test-only fault below
    # corrupts the reply after that, as a faulty transport or a bug would.
    journal.record("step", round_, binding, reply_digest(m.make_content(reply_config, **out)))
    if summary:
        _record_summary(run_journal(node), binding)
    _maybe_misbehave(silo_name(node), round_, out)
    reply_config["seconds"] = time.perf_counter() - t0
    reply = m.make_content(reply_config, **out)
    _remember_step(node.context, round_, reply)
    return Message(reply, reply_to=msg)


def _select_epoch(msg: Message, node: Node, config: dict, trainer: SiloTrainer) -> None:
    """Before this step's gradients move the weights: keep them as the best epoch so far
    (`keep`: the last evaluation was computed at them), or go back to the kept ones for the
    final read (`restore`). Non-private runs only (run_checks.check_selection)."""
    private = trainer.spec.dp or trainer.spec.transcript_sigma > 0
    if not run_checks.check_selection(node, config, private):
        return
    if config.get("keep"):
        trainer.keep()
    if config.get("restore"):
        if m.get_array(msg, "grad", np.float32, 1 if trainer.spec.outputs == 1 else 2,
                       required=False) is not None:
            raise m.ProtocolError("restore comes with the final read, after the last "
                                  "gradients: not with gradients to apply")
        try:
            trainer.restore()
        except ValueError as exc:
            raise m.ProtocolError(f"restore: {exc}") from None
    save_trainer(node.context, trainer)


def _apply_gradients(msg: Message, node: Node, trainer: SiloTrainer, x: np.ndarray) -> None:
    """Train on the batches released last step (`done_plan`, `done_sizes`) with the gradients
    the authority sent for them (`grad`), when it sent any, and keep the model."""
    width = trainer.spec.outputs
    grad = m.get_array(msg, "grad", np.float32, 1 if width == 1 else 2, required=False)
    if grad is not None and grad.ndim == 2 and grad.shape[1] != width:
        raise m.ProtocolError(f"gradients have {grad.shape[1]} columns; this silo's "
                              f"embedding has {width}")
    if grad is not None:
        done = m.get_array(msg, "done_plan", np.int64, 1)
        sizes = m.get_array(msg, "done_sizes", np.int64, 1)
        batches = [x[rows_at(node.context, b)] for b in m.split_batches(done, sizes)]
        trainer.replay(batches, m.split_batches(grad, sizes))
        save_trainer(node.context, trainer)


def _step_releases(msg: Message, node: Node, trainer: SiloTrainer, x: np.ndarray, round_: int,
                   binding: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """A step's reply arrays and config: the contributions for `plan` and `eval` (masked under
    secure aggregation), and for `eval` the summary and reason codes when asked."""
    config = m.get_config(msg)
    out: dict[str, np.ndarray] = {}
    secure = bool(node.state["model"].get("secure", False))
    reply_config: dict = {"seconds": 0.0}
    for key in ("plan", "eval"):
        positions = m.get_array(msg, key, np.int64, 1, required=False)
        if positions is not None:
            values = clip_contribution(trainer.released(x[rows_at(node.context, positions)], round_,
                                                        key, digest(positions)))
            out[key] = masked(node, values, round_, key, binding) if secure else values
            if key == "eval" and config.get("summary") and values.ndim == 1:
                # Bound to the group it describes, as transcript noise is: a re-aligned
                # run asking the same round about a group one person apart must not get
                # the same noise twice (their difference would be that person, exact).
                noise = silo_random(node).generator(
                    "summary", trainer.run_key, round_, digest(positions)
                ) if trainer.spec.dp else None
                reply_config.update(contribution_summary(values, noise))
            if key == "eval" and int(config.get("explain", 0)) > 0:
                data = silo_matrix(node)
                why = explained(trainer, data, data.x[rows_at(node.context, positions)],
                                int(config["explain"]))
                out.update(why[0])
                reply_config.update(why[1])
    return out, reply_config


def _check_step_policy(msg: Message, config: dict, policy: SiloPolicy) -> None:
    """What a training step may ask of this silo: aggregates (the summary, reason codes) only
    over at least `min_group` distinct people, and no more reason codes than allowed."""
    reasons = int(config.get("explain", 0))
    if reasons > 0:
        policy.check_explain(reasons)
    if not (config.get("summary") or reasons > 0):
        return
    positions = m.get_array(msg, "eval", np.int64, 1, required=False)
    if positions is not None:
        _check_group(policy, "a summary or reason codes", positions)


SUMMARY = "summary"  # journal kind: the one step of a run answered with a summary


def _asks_summary(msg: Message, config: dict) -> bool:
    return bool(config.get("summary")) and m.get_array(msg, "eval", np.int64, 1,
                                                        required=False) is not None


def _check_one_summary(journal: Journal, binding: bytes) -> None:
    """One contribution summary per run (the run's journal, kept across re-aligns and their
    new masking keys), as the authority's accountant counts it: each summary is a Gaussian
    release, and two over groups one person apart differ by that person's contribution with
    only their noise to hide it. The step that got the summary may be sent again (a lost
    reply); no other step gets one."""
    seen = journal.entries.get((SUMMARY, "run"))
    if seen is not None and seen[0] != binding.hex():
        raise RefusedError("a contribution summary was answered already in this run; this "
                           "silo answers one per run (a second, over a group one person "
                           "apart, would release that person's contribution outside the "
                           "run's accounting)")


def _record_summary(journal: Journal, binding: bytes) -> None:
    journal.record(SUMMARY, "run", binding, binding)


def _check_group(policy: SiloPolicy, what: str, positions: np.ndarray) -> None:
    policy.check_people(what, positions)


def masked(node: Node, values: np.ndarray, round_: int,
           purpose: str, binding: bytes) -> np.ndarray:
    if "mask" not in node.state:
        raise m.ProtocolError("secure aggregation without pairwise keys: send query.peers first")
    record = m.config_record(node.state, "mask")
    shared = {k.removeprefix("peer."): m.config_bytes(record, k) for k in record
              if k.startswith("peer.")}
    if not shared:
        raise m.ProtocolError("secure aggregation needs at least two silos")
    run_key = str(node.state["model"]["run"])
    try:
        return masked_share(values, silo_name(node), shared,
                            mask_context(run_key, round_, purpose, binding))
    except MaskingError as exc:
        raise m.ProtocolError(str(exc)) from None


SUMMARY_QUANTILES = (0.1, 0.5, 0.9)
# The summary's histogram: fixed bins over a declared range of contributions (logit units).
SUMMARY_EDGES = np.linspace(-8.0, 8.0, 65)


def contribution_summary(values: np.ndarray, rng: np.random.Generator | None
                         ) -> dict[str, float]:
    """Five numbers about this silo's contributions over everyone scored, for the report's
    per-silo points: their mean, mean absolute deviation and 10/50/90 % quantiles.

    All five are read off ONE differentially private histogram: contributions clipped to the
    declared range and counted in fixed bins, each count with Gaussian noise of std
    STATISTICS_NOISE_MULTIPLIER (one person moves one count by one: L2 sensitivity 1), drawn
    from the silo's secret stream `rng`; the authority accounts it as one Gaussian release.
    Without DP-SGD (`rng` None) the model claims no epsilon and the counts are exact."""
    counts = np.histogram(np.clip(values.astype(np.float64), SUMMARY_EDGES[0], SUMMARY_EDGES[-1]),
                          bins=SUMMARY_EDGES)[0].astype(np.float64)
    if rng is not None:
        counts = np.maximum(counts + rng.normal(0.0, STATISTICS_NOISE_MULTIPLIER, len(counts)),
                            0.0)
    centres = (SUMMARY_EDGES[:-1] + SUMMARY_EDGES[1:]) / 2
    total = max(counts.sum(), 1.0)
    mean = float(counts @ centres / total)
    cdf = np.cumsum(counts) / total
    q10, q50, q90 = (float(centres[min(int(np.searchsorted(cdf, q)), len(centres) - 1)])
                     for q in SUMMARY_QUANTILES)
    return {"summary.mean": mean, "summary.mad": float(counts @ np.abs(centres - mean) / total),
            "summary.q10": q10, "summary.q50": q50, "summary.q90": q90}


def explained(trainer: SiloTrainer, data: SiloMatrix, x: np.ndarray, k: int
              ) -> tuple[dict[str, np.ndarray], dict]:
    """Reason codes for the rows `x`, as reply arrays and config entries."""
    if trainer.spec.outputs != 1:
        raise m.ProtocolError("reason codes need aggregation.mode=sum (one contribution each)")
    if trainer.spec.transcript_sigma > 0:
        raise m.ProtocolError("reason codes would release exact contributions that transcript "
                              "DP's accounting does not cover; ask for none (explain=0)")

    why = explain(trainer, data, x, k)
    arrays = {"explain_delta": why.delta, "reason_index": why.index,
              "reason_share": why.share}
    return arrays, {"explain.reference": why.reference, "explain.features": why.features}


SILO_FAULT = "FEDSCORE_SILO_FAULT"


def _maybe_misbehave(silo: str, round_: int, out: dict[str, np.ndarray]) -> None:
    """A faulty silo on purpose (for tests): `FEDSCORE_SILO_FAULT=silo:round:kind` makes that
    silo's reply to that step malformed: `shape` drops a contribution, `dtype` sends float64."""
    fault = os.environ.get(SILO_FAULT, "").split(":")
    if len(fault) != 3 or fault[0] != silo or fault[1] != str(round_) or "plan" not in out:
        return
    if fault[2] == "shape":
        out["plan"] = out["plan"][:-1]
    elif fault[2] == "dtype":
        out["plan"] = out["plan"].astype(np.float64)


# ---- repeated steps: the authority re-sends a step whose reply it never got ------------------


def _repeated_step(msg: Message, context: Context) -> Message | None:
    """The cached reply when this step was already applied (its reply was lost); applying it
    again would train on the same batches twice and spend privacy the ledger never sees."""
    round_ = int(m.get_config(msg).get("round", 0))
    if "last.step" not in context.state:
        return None
    last = m.config_int(m.config_record(context.state, "last.step"), "round")
    if round_ == last:
        log.warning("step %d arrived again; answering from the cache", round_)
        reply = m.make_content(dict(context.state["last.config"]))
        if "last.arrays" in context.state:
            reply["arrays"] = context.state["last.arrays"]
        return Message(reply, reply_to=msg)
    if round_ < last:
        raise m.ProtocolError(f"step {round_} is older than step {last}, already applied")
    return None


def _remember_step(context: Context, round_: int, reply: RecordDict) -> None:
    context.state["last.step"] = ConfigRecord({"round": round_})
    context.state["last.config"] = reply["config"]
    if "arrays" in reply:
        context.state["last.arrays"] = reply["arrays"]
    elif "last.arrays" in context.state:
        del context.state["last.arrays"]


def forget_steps(context: Context) -> None:
    for key in ("last.step", "last.config", "last.arrays"):
        if key in context.state:
            del context.state[key]
