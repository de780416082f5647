"""Lost messages: the authority re-sends a step that got no reply, a bounded number of times,
and a silo answers a repeated step from its cache instead of applying it twice."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from clients.protocol import messages as m
from clients.silo.training import _remember_step, _repeated_step
from server.federation import Federation, FederationError


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps every message with the running task's identity; outside an app, set one.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


_ids = itertools.count()


def _stamp(msg: Message) -> str:
    msg.metadata.__dict__["_message_id"] = f"{next(_ids):064x}"
    return msg.metadata.message_id


class ScriptedGrid:
    """A grid whose node answers the n-th copy of a message as `script(n, msg)` says: a reply
    content, an Error, or None (silence)."""

    def __init__(self, script) -> None:
        self.script = script
        self.pushed: list[Message] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return [1]

    def push_messages(self, msgs):
        ids = []
        for msg in msgs:
            ids.append(_stamp(msg))
            answer = self.script(len(self.pushed), msg)
            self.pushed.append(msg)
            if answer is not None:
                self.replies[msg.metadata.message_id] = Message(answer, reply_to=msg)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


def _federation(script, retries: int = 2) -> tuple[Federation, ScriptedGrid]:
    grid = ScriptedGrid(script)
    fed = Federation(grid, ["payments"], reply_timeout=0.2, retries=retries)
    fed.nodes = {"payments": 1}
    return fed, grid


def test_a_silent_silo_is_retried_then_the_run_stops():
    fed, grid = _federation(lambda n, msg: None, retries=2)
    with pytest.raises(FederationError, match=r"payments stopped answering.*3 attempt"):
        fed.exchange(m.STEP, {"payments": m.make_content({"round": 4})})
    assert len(grid.pushed) == 3
    assert {int(m.get_config(p)["round"]) for p in grid.pushed} == {4}  # the same step


def test_an_undeliverable_message_is_sent_again_after_a_wait():
    def script(n: int, msg: Message):
        if n == 0:
            return Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable")
        return m.make_content({"ok": 1})

    fed, grid = _federation(script)
    t0 = time.monotonic()
    replies = fed.exchange(m.STEP, {"payments": m.make_content({"round": 1})})
    assert m.get_config(replies["payments"]) == {"ok": 1}
    assert len(grid.pushed) == 2
    # Not at once: an offline node gets `reply_timeout` to come back before the re-send.
    assert time.monotonic() - t0 >= fed.reply_timeout


def test_a_silos_own_error_is_not_retried():
    fed, grid = _federation(lambda n, msg: Error(code=m.PROTOCOL_ERROR, reason="bad plan"))
    with pytest.raises(FederationError, match="payments: bad plan"):
        fed.exchange(m.STEP, {"payments": m.make_content({"round": 1})})
    assert len(grid.pushed) == 1


def _step(round_: int) -> Message:
    msg = Message(m.make_content({"round": round_}), dst_node_id=1, message_type=m.STEP)
    _stamp(msg)
    return msg


def test_a_repeated_step_is_answered_from_the_cache_and_a_stale_one_refused():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert _repeated_step(_step(1), context) is None  # nothing applied yet
    reply = m.make_content({"seconds": 0.5}, plan=np.arange(5, dtype=np.float32))
    _remember_step(context, 3, reply)
    again = _repeated_step(_step(3), context)
    assert again is not None
    np.testing.assert_array_equal(m.get_array(again, "plan"), np.arange(5, dtype=np.float32))
    assert m.get_config(again) == {"seconds": 0.5}
    assert _repeated_step(_step(4), context) is None  # the next step is new work
    with pytest.raises(m.ProtocolError, match="older than step 3"):
        _repeated_step(_step(2), context)


def test_replies_are_handed_over_as_they_arrive():
    """The PSI pipeline acts on one silo's reply while another silo still works: here the
    social silo only answers once the authority has acted on the payments reply."""
    held: list[Message] = []

    def script(n: int, msg: Message):
        if msg.metadata.dst_node_id == 2:
            held.append(msg)  # social answers later
            return None
        return m.make_content({"ok": 1})

    grid = ScriptedGrid(script)
    fed = Federation(grid, ["payments", "social"], reply_timeout=5.0, retries=0)
    fed.nodes = {"payments": 1, "social": 2}
    pending = fed.push(m.STEP, {s: m.make_content({"round": 1}) for s in fed.silos})
    order = []
    for silo, _ in fed.each(pending):
        order.append(silo)
        if silo == "payments":
            grid.replies[held[0].metadata.message_id] = Message(m.make_content({"ok": 1}),
                                                                reply_to=held[0])
    assert order == ["payments", "social"]
