"""Silo-side checks of stop 35 (docs/threat-model.md's deviation table), each an attack played
by a deviating authority with exactly the messages it can send, against the silos' real
ClientApp (no engine): the mechanism first (the check patched out: the silo answers what it
must not), then the refusal.

- `query.score` in a run announced as a tree run (clients/silo/run_checks.py `REQUESTS`);
- SecureBoost partitions of nodes the silo never summed, over rows not the node's, more than
  once, or beyond the trees and depth the run announced (clients/silo/tree_caps.py);
- a second contribution summary after a re-align under secure sum (clients/silo/state.py
  `run_journal`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from clients.protocol import gbdt as msg
from clients.protocol import messages as m
from clients.protocol.run_mode import RunMode
from clients.silo import run_checks, training, tree_caps
from clients.silo.gbdt import Binning
from clients.silo.state import silo_journal
from server.alignment import Alignment, announce
from tests.test_gbdt_wire import AppGrid as TreeGrid
from tests.test_gbdt_wire import (  # noqa: F401 (fixtures)
    announce_run,
    ask,
    federation,
    level_request,
    refused,
    tree_start,
)
from tests.test_security_protocol import (  # noqa: F401 (fixtures)
    PEOPLE,
    AppGrid,
    _align,
    _aligned,
    _model_config,
    _policy,
    _refused,
    _step,
    _task_identity,
    grid,
    released,
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


# ---- SecureBoost: partitions tied to summed nodes, trees and splits capped -------------------


def _level(tree: int, node: int, rows: np.ndarray) -> RecordDict:
    """A level's sums of one node of a tree whose gradients the silo holds already."""
    return m.make_content({"tree": tree}, nodes=np.array([node], dtype=np.int64),
                          rows=rows.astype(np.int64), sizes=np.array([len(rows)], np.int64))


def _root_summed(federation, run: str, *, trees: int, depth: int  # noqa: F811
                 ) -> tuple[TreeGrid, dict[str, np.ndarray], np.ndarray]:
    """SecureBoost run `run` (`trees` trees of `depth`) started on every training row of the
    fixture's federation and tree 0's root summed, as an honest authority begins:
    (the silos' app grid, their matrices, every training position)."""
    _, wire, xs = federation
    everyone = np.arange(len(xs["payments"]), dtype=np.int64)
    announce_run(wire, run)
    assert not ask(wire, 1, msg.START, tree_start(run, everyone, trees=trees,
                                                  depth=depth)).has_error()
    assert not ask(wire, 1, msg.LEVEL, level_request(0, [everyone], len(everyone))).has_error()
    return wire, xs, everyone


def _split(tree: int, node: int, feature: int, bin_: int, rows: np.ndarray) -> RecordDict:
    return m.make_content({"tree": tree}, nodes=np.array([node], dtype=np.int64),
                          features=np.array([feature], dtype=np.int64),
                          bins=np.array([bin_], dtype=np.int64), rows=rows.astype(np.int64),
                          sizes=np.array([len(rows)], dtype=np.int64))


def test_partitions_of_nodes_never_summed_are_refused(federation, monkeypatch) -> None:  # noqa: F811
    """With one root histogram asked, a deviating authority asks partitions of node 5 (never
    summed) over every training row, one bin at a time: the bits give every person's bin of
    the column, the whole binned matrix column by column. The silo answers a partition only
    for a node it can place, over exactly that node's rows."""
    wire, xs, everyone = _root_summed(federation, "capsa", trees=2, depth=3)
    n = len(everyone)
    exact = Binning(32).apply(xs["payments"])[:, 0]
    with monkeypatch.context() as old:  # the mechanism: partitions of any node, any rows
        old.setattr(tree_caps, "check_split", lambda *a: None)
        below = np.zeros(n, dtype=np.int64)
        for b in range(31):
            bits = np.unpackbits(m.get_array(ask(wire, 1, msg.SPLIT, _split(
                0, 5, 0, b, everyone)), "left", np.uint8, 1), count=n).astype(bool)
            below += ~bits  # rows above bin b
        np.testing.assert_array_equal(below, exact)
    refused(ask(wire, 1, msg.SPLIT, _split(0, 5, 0, 15, everyone)),
            "node 5, whose sums this silo never gave")
    # The root over other rows than its own (every training row), or a node below the depth.
    refused(ask(wire, 1, msg.SPLIT, _split(0, 0, 0, 15, everyone[:200])),
            "node 0 over other rows than the node's")
    refused(ask(wire, 1, msg.LEVEL, _level(0, 0, everyone[:200])),
            "the root is every training row")
    refused(ask(wire, 1, msg.LEVEL, _level(0, 7, everyone)), "below the announced depth 3")
    # The honest sequence: the root's partition once, then its smaller child's sums, then
    # the larger child's partition over the root's rows less the summed child's.
    mid = int(np.sort(exact)[n // 2]) - 1  # both children hold people
    root_bits = m.get_array(ask(wire, 1, msg.SPLIT, _split(0, 0, 0, mid, everyone)), "left",
                            np.uint8, 1)
    left = np.unpackbits(root_bits, count=n).astype(bool)
    refused(ask(wire, 1, msg.SPLIT, _split(0, 0, 0, 15, everyone)), "partitioned once")
    small, large = (1, 2) if left.sum() <= (~left).sum() else (2, 1)
    rows = {1: everyone[left], 2: everyone[~left]}
    # This silo partitioned the root: its children's rows are known exactly.
    refused(ask(wire, 1, msg.LEVEL, _level(0, small, everyone)), "other rows than the node's")
    assert not ask(wire, 1, msg.LEVEL, _level(0, small, rows[small])).has_error()
    refused(ask(wire, 1, msg.LEVEL, _level(0, 2 * small + 1, everyone)),
            "rows outside its parent")
    assert not ask(wire, 1, msg.SPLIT, _split(0, large, 1, 15, rows[large])).has_error()
    refused(ask(wire, 1, msg.SPLIT, _split(0, 2 * large + 1, 1, 15, rows[large])),
            "never gave")


def test_trees_and_splits_beyond_the_announced_run_are_refused(federation) -> None:  # noqa: F811
    """A run announced with 1 tree of depth 1 has one partition to ask. Gradients for a second
    tree, the same tree index again, a start re-sent to reset the count, or one announcing
    more trees are refused; the count survives a restart of the silo's process."""
    wire, _, everyone = _root_summed(federation, "capsb", trees=1, depth=1)
    n = len(everyone)
    assert not ask(wire, 1, msg.SPLIT, _split(0, 0, 0, 15, everyone)).has_error()
    refused(ask(wire, 1, msg.LEVEL, level_request(1, [everyone], n)),
            "gradients for tree 1", "announced 1 trees")
    refused(ask(wire, 1, msg.LEVEL, level_request(0, [everyone], n)), "each tree comes once")
    assert not ask(wire, 1, msg.START, tree_start("capsb", everyone, trees=1,
                                                  depth=1)).has_error()
    refused(ask(wire, 1, msg.LEVEL, level_request(0, [everyone], n)), "each tree comes once")
    refused(ask(wire, 1, msg.START, tree_start("capsb", everyone, trees=50, depth=5)),
            "announced 1 trees of depth 1", "a run key names one configuration")
    context = wire.contexts[1]
    for key in list(context.state.keys()):  # a restart: the node's state is gone
        if key not in ("model", "align"):
            del context.state[key]
    assert not ask(wire, 1, msg.START, tree_start("capsb", everyone, trees=1,
                                                  depth=1)).has_error()
    refused(ask(wire, 1, msg.LEVEL, level_request(0, [everyone], n)), "each tree comes once")
    # A start of a SecureBoost run that announces no trees is malformed.
    bare = m.make_content({"run": "capsb", "bins": 32, "binning": "uniform"},
                          positions=everyone)
    assert "announce its trees and depth" in ask(wire, 1, msg.START, bare).error.reason


def test_the_split_cap_is_trees_times_inner_nodes() -> None:
    assert tree_caps.Caps(trees=3, depth=2).inner == 3  # nodes 0, 1, 2 can split


# ---- one contribution summary per run, across re-aligns ------------------------------------


def test_a_second_summary_after_a_re_align_is_refused(grid: AppGrid, released, monkeypatch):  # noqa: F811
    """Differencing across a re-align: the authority gets a summary over everyone, aligns the
    same run key again (new masking keys, so a new answer journal), replays the same step to
    the same model, and asks a summary over everyone but one person. Without DP-SGD both are
    exact: N x mean - (N - 1) x mean' is that person's contribution to within a bin."""
    def attack(grid: AppGrid):
        fed, run_key = _aligned(grid)
        first = np.arange(50, dtype=np.int64)
        everyone = np.arange(PEOPLE, dtype=np.int64)
        grid.send("payments", m.STEP, _step(1, plan=first))
        one = grid.send("payments", m.STEP, _step(2, eval_=everyone, summary=True, done=first))
        assert not one.has_error(), one.error.reason
        rows = np.arange(PEOPLE, dtype=np.int64)
        announce(fed, Alignment(rows, dict.fromkeys(grid.silos, rows), {}),
                 _model_config(run_key))
        grid.send("payments", m.STEP, _step(1, plan=first))
        return one, grid.send("payments", m.STEP, _step(2, eval_=everyone[1:], summary=True,
                                                        done=first))

    with monkeypatch.context() as old:  # the mechanism: one summary per masking key
        old.setattr(training, "run_journal", silo_journal)
        one, two = attack(grid)
        assert not two.has_error(), two.error.reason
        means = [m.get_config(r)["summary.mean"] for r in (one, two)]
        stolen = PEOPLE * means[0] - (PEOPLE - 1) * means[1]
        exact = next(v for who, v in released if who == "payments" and len(v) == PEOPLE)[0]
        assert abs(stolen - exact) <= training.SUMMARY_EDGES[1] - training.SUMMARY_EDGES[0]
        assert abs(exact) > 1e-3
    _, two = attack(AppGrid(grid.root))
    _refused(two, "a contribution summary was answered already in this run")
