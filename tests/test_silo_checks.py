"""Silo-side checks of stop 35 (docs/threat-model.md's deviation table), each an attack played
by a deviating authority with exactly the messages it can send, against the silos' real
ClientApp (no engine): the mechanism first (the check patched out: the silo answers what it
must not), then the refusal.

- `query.score` in a run announced as a tree run (clients/silo/run_checks.py `REQUESTS`).
"""

from __future__ import annotations

import numpy as np

from clients.protocol import messages as m
from clients.protocol.run_mode import RunMode
from clients.silo import run_checks
from tests.test_security_protocol import (  # noqa: F401 (fixtures)
    PEOPLE,
    AppGrid,
    _align,
    _aligned,
    _policy,
    _refused,
    _task_identity,
    grid,
    root,
)

# ---- query.score belongs to an MLP run ------------------------------------------------------


def test_a_tree_run_is_not_answered_score_queries(grid: AppGrid, monkeypatch):  # noqa: F811
    """A DP tree run announces the MLP spec of its idle DP-SGD machinery: no noise, no
    training. `query.score` there would release the bottom model's exact outputs for every
    position asked, under a run that announced nothing of the kind."""
    _policy(grid.root, "payments", require_secure_sum=False)
    assert not grid.send("payments", m.ALIGN, _align("runsc", kind="gbdt",
                                                     epsilon=1.0)).has_error()
    ask_ = m.make_content({"request": "sc1", "explain": 0},
                          positions=np.arange(PEOPLE, dtype=np.int64))
    with monkeypatch.context() as old:  # the mechanism: no kind check on query.score
        old.setattr(run_checks, "check_request", lambda node, message_type: RunMode())
        answered = grid.send("payments", m.SCORE, ask_)
        assert m.get_array(answered, "contributions", np.float32, 1).shape == (PEOPLE,)
    other = m.make_content({"request": "sc2", "explain": 0},
                           positions=np.arange(PEOPLE, dtype=np.int64))
    _refused(grid.send("payments", m.SCORE, other),
             "query.score is no request of a model.kind=gbdt run")
    # An MLP run is answered.
    _aligned(grid)
    assert not grid.send("device", m.SCORE, m.make_content(
        {"request": "sc3", "explain": 0}, positions=np.arange(5, dtype=np.int64))).has_error()
