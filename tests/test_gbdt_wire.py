"""`model.kind=gbdt` in `fedscore run` (issue 20 item 1): its configuration, the Flower-side
endpoint against the in-process driver (the silo's real ClientApp, no engine), and what a silo
can learn of the labels from the gradients it receives under randomised response."""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from bench.gbdt_wired import compare
from clients.protocol import gbdt as msg
from clients.protocol import messages as m
from clients.protocol.run_mode import RunMode
from clients.protocol.schema import federation_silos
from clients.silo import app as ca
from clients.silo import run_checks, tree_caps
from clients.silo.data import load_silo
from clients.silo.gbdt import Binning, GbdtSilo
from clients.silo.gbdt_handlers import tree_inputs
from clients.silo.policy import MAX_REASONS, SiloPolicy
from server import gbdt
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat
from server.federation import Federation, FederationError
from server.gbdt_boost import base_margin, fit, params_of, rr_gradients
from server.gbdt_run import annotate, refuse_unwired
from server.gbdt_scores import keep_best, route, score
from server.gbdt_silos import FlowerSilos, start
from server.label_dp import flip_probability, keep_probability, randomized_response
from server.run_keys import computed_settings
from simulations.data.paths import Parties
from simulations.data.population import write_parties
from simulations.run.gbdt import best_count
from tests.conftest import run_cli
from tests.test_gbdt import by_silo, credit_like
from tests.test_security_protocol import _population  # the same 1,000 people, generated once

GBDT = {"model.kind": "gbdt", "privacy.epsilon": "inf"}


# ---- configuration -----------------------------------------------------------------------


def test_gbdt_takes_its_defaults_from_the_privacy_mode() -> None:
    """Without DP the SecureBoost trees' defaults (and the rr protection at label eps 2); at a
    finite epsilon (the default) the DP trees' (server/gbdt_dp_run.py, tests there)."""
    cfg = parse_flat(AuthorityConfig, GBDT)
    assert (cfg.model.kind, cfg.gbdt.protection, cfg.privacy.label_epsilon) == ("gbdt", "rr", 2)
    assert (cfg.gbdt.trees, cfg.gbdt.lr, cfg.gbdt.reg_lambda) == (50, 0.1, 1.0)
    assert (cfg.gbdt.binning, cfg.gbdt.min_child_weight) == ("quantile", 20.0)
    assert math.isinf(cfg.privacy.epsilon)
    dp = parse_flat(AuthorityConfig, {"model.kind": "gbdt"})
    assert (dp.gbdt.trees, dp.gbdt.lr, dp.gbdt.reg_lambda) == (300, 0.5, 300.0)
    assert dp.gbdt.binning == "uniform"
    with pytest.raises(ConfigError, match=r"gbdt\.binning=quantile with privacy\.epsilon=1"):
        parse_flat(AuthorityConfig, {"model.kind": "gbdt", "gbdt.binning": "quantile"})
    uniform = parse_flat(AuthorityConfig, {**GBDT, "gbdt.binning": "uniform"})
    assert params_of(uniform).binning == "uniform"


@pytest.mark.parametrize(("key", "value", "words"), [
    ("topology", "horizontal", "vertical only"),
    ("gbdt.bins", "1", "gbdt.bins=1"),
    ("gbdt.bins", "300", "gbdt.bins=300"),
    ("gbdt.depth", "0", "gbdt.depth=0"),
    ("gbdt.trees", "0", "gbdt.trees=0"),
    ("gbdt.lr", "0", "gbdt.lr=0"),
    ("gbdt.reg_lambda", "-1", "gbdt.reg_lambda=-1"),
    ("gbdt.min_child_weight", "-0.5", "gbdt.min_child_weight=-0.5"),
    ("gbdt.protection", "plain", "choose one of rr, he"),
    ("gbdt.binning", "median", "choose one of quantile, uniform"),
    ("privacy.transcript_sigma", "1", "transcript_sigma=0"),
    ("model.kind", "forest", "choose one of mlp, gbdt"),
])
def test_gbdt_settings_are_checked_at_the_edge(key: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        parse_flat(AuthorityConfig, {**GBDT, key: value})


def test_he_is_refused_before_any_message_and_needs_power_of_two_bins() -> None:
    with pytest.raises(ConfigError, match="power of two"):
        parse_flat(AuthorityConfig, {**GBDT, "gbdt.protection": "he", "gbdt.bins": "24"})
    cfg = parse_flat(AuthorityConfig, {**GBDT, "gbdt.protection": "he"})
    with pytest.raises(ConfigError, match="in process only"):
        refuse_unwired(cfg)
    refuse_unwired(parse_flat(AuthorityConfig, GBDT))  # rr runs


def test_a_tree_run_says_its_model_epsilon_is_infinite_and_what_the_authority_saw() -> None:
    out = {"model": {"bias": 0.0, "reasons": 0}, "authority_sees": ["the sum"]}
    annotate(out, parse_flat(AuthorityConfig, {**GBDT, "privacy.label_epsilon": "1.5"}))
    assert out["model"]["kind"] == out["model_kind"] == "gbdt"
    assert out["gbdt"]["model_epsilon"] == "inf"
    assert "without differential privacy" in out["gbdt"]["model_note"]
    assert "privacy.label_epsilon=1.5" in out["gbdt"]["label_protection"]
    assert "the sum" not in out["authority_sees"]
    assert any("(silo, feature index, bin)" in line for line in out["authority_sees"])
    assert out["gbdt"]["binning"] == "quantile"
    assert any("the bin is a rank" in line for line in out["authority_sees"])
    kept = {"model": {"bias": 0.0}, "history": [{"trees": 5}, {"trees": 7, "kept": True},
                                                {"trees": 10}]}
    annotate(kept, parse_flat(AuthorityConfig, GBDT))
    assert (kept["gbdt"]["trees"], kept["gbdt"]["trees_kept"]) == (50, 7)
    mlp = {"model": {"bias": 0.0}, "authority_sees": ["the sum"]}
    annotate(mlp, parse_flat(AuthorityConfig, {}))
    assert mlp == {"model": {"bias": 0.0}, "authority_sees": ["the sum"]}


def test_tree_settings_leave_an_mlp_runs_key_alone() -> None:
    """The default run's draws are keyed by its settings: adding model.kind and gbdt.* must
    not change an MLP run's key, and must change a tree run's."""
    base = {"seed": 0, "train.lr": 0.01}
    mlp = {**base, "model.kind": "mlp", "gbdt.trees": 50}
    assert computed_settings(mlp) == base
    assert computed_settings({**mlp, "gbdt.trees": 7}) == base
    trees = {**base, "model.kind": "gbdt", "gbdt.trees": 50}
    assert computed_settings(trees) == trees


@pytest.mark.stress
@pytest.mark.slow
def test_engine_run_grows_the_in_process_trees(tmp_path: Path) -> None:
    """On demand (`pytest -m stress`, about 2 minutes): a whole run on the Flower engine at
    label_epsilon=inf scores its test people exactly as the in-process core does."""
    proc = run_cli("run", "--out", "run", "--users", "3000", "--set", "model.kind=gbdt",
                   "--set", "privacy.epsilon=inf", "--set", "privacy.label_epsilon=inf",
                   cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stderr[-3000:], proc.stdout[-3000:])
    figures = compare(tmp_path / "run", Parties(tmp_path / "run.parties"))
    assert figures["federated_all_test_auc"] == pytest.approx(figures["in_process_test_auc"],
                                                              abs=1e-9)
    assert figures["round_trips"] <= 50 * 2 * 5 + 2


# ---- the Flower endpoint against the in-process driver -----------------------------------


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps every message with the running task's identity; outside an app, set one.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


_ids = itertools.count(1)


class AppGrid:
    """The Grid calls Federation makes, answered by the silos' real ClientApp (one Context
    per node, its state kept between messages); every message is logged."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.app = ca.make_client_app(root, None, plaintext=True)
        silos = federation_silos(root)
        self.contexts = {n + 1: Context(run_id=1, node_id=n + 1,
                                        node_config={"partition-id": n}, state=RecordDict(),
                                        run_config={}) for n in range(len(silos))}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, msgs: list[Message]) -> list[str]:
        ids = []
        for one in msgs:
            one.metadata.__dict__["_message_id"] = f"{next(_ids):064x}"
            ids.append(one.metadata.message_id)
            self.sent.append(one)
            self.replies[one.metadata.message_id] = self.app(one, self.contexts[
                one.metadata.dst_node_id])
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def aligned_federation(root: Path) -> tuple[Federation, AppGrid, dict[str, np.ndarray]]:
    """Three silos with their real tables under `root`, aligned on the people all of them
    hold (the test plays PSI's result: position i is the i-th common identifier); with each
    silo's aligned prepared matrix. Their operators allow what these tests ask (`OPEN`):
    groups of one (trees at min_child_weight 0 or 1 have nodes of a few people), reason codes,
    plaintext answers; the attack tests set the policy they test."""
    # Flower stamps every message with the running task's identity, and a module fixture is
    # set up before the autouse identity when a test that needs it runs alone.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    write_parties(_population(), root)
    for silo in federation_silos(root):
        OPEN.write(root / silo)
    grid = AppGrid(root)
    fed = Federation(grid, federation_silos(root))  # type: ignore[arg-type]
    fed.connect()
    tables = {s: load_silo(root / s, s, None) for s in fed.silos}
    common = sorted(functools.reduce(np.intersect1d, [t.ids.to_numpy() for t in tables.values()]))
    xs = {}
    for silo, table in tables.items():
        rows = pd.Index(table.ids.to_numpy()).get_indexer(common).astype(np.int64)
        grid.contexts[fed.nodes[silo]].state["align"] = m.arrays(pos2row=rows)
        xs[silo] = np.asarray(table.x[rows], dtype=np.float64)
    return fed, grid, xs


OPEN = SiloPolicy(min_group=1, explain=MAX_REASONS, require_secure_sum=False)


def announce_run(grid: AppGrid, run: str, kind: str = "gbdt", epsilon: float = math.inf
                 ) -> None:
    """What `query.align`'s announcement leaves in each silo (played, as `aligned_federation`
    plays PSI): the run key and its mode, pinned (clients/silo/run_checks.py)."""
    for context in grid.contexts.values():
        context.state["model"] = ConfigRecord({"run": run, **RunMode(kind, epsilon).to_config()})


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Federation, AppGrid, dict]:
    fed, grid, xs = aligned_federation(tmp_path_factory.mktemp("gbdtwire") / "parties")
    return fed, grid, {s: tree_inputs(x) for s, x in xs.items()}  # what the silo's trees bin


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
def test_flower_trees_equal_the_in_process_trees(federation, binning: str) -> None:
    """The same trees, predictions and per-silo contributions as the in-process driver on the
    same aligned matrices, with either binning (quantile: each silo's edges over its training
    rows, applied to everyone it routes); one level's histograms and one level's partitions
    per message, so a tree costs at most 2 x depth round trips."""
    fed, grid, xs = federation
    n = len(next(iter(xs.values())))
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(n, size=n * 2 // 3, replace=False))
    val = np.setdiff1d(np.arange(n), train)
    y = (rng.random(n) < 1 / (1 + np.exp(-3 * xs["payments"][:, 0]))).astype(np.float64)
    params = gbdt.GbdtParams(trees=3, depth=3, bins=16, binning=binning)  # type: ignore[arg-type]
    announce_run(grid, f"run1{binning}")
    features = start(fed, f"run1{binning}", params.bins, train, binning=binning,
                     trees=params.trees, depth=params.depth)
    assert features == {s: x.shape[1] for s, x in xs.items()}
    silos = FlowerSilos(fed, features, route_positions=np.arange(n))
    grid.sent.clear()
    fitted = fit(silos, y[train], 0.0, params)
    edges = {s: Binning.fit(x[train], params.bins, binning) for s, x in xs.items()}
    local = {s: GbdtSilo(s, x[train], bins=params.bins, binning=edges[s])
             for s, x in xs.items()}
    assert fitted.model == gbdt.fit_trees(local, y[train], params)
    uniform = {s: GbdtSilo(s, x[train], bins=params.bins) for s, x in xs.items()}
    assert (fitted.model == gbdt.fit_trees(uniform, y[train], params)) == (binning == "uniform")
    assert silos.round_trips <= params.trees * 2 * params.depth
    assert len(grid.sent) <= silos.round_trips * len(xs)
    bits = route(fitted.model, silos)
    scored = score(fitted, bits, n, train, val, y)
    everyone = {s: GbdtSilo(s, x, bins=params.bins, binning=edges[s]) for s, x in xs.items()}
    np.testing.assert_allclose(scored.margins, gbdt.predict_trees(fitted.model, everyone, n))
    total = scored.bias + sum(scored.contributions.values())
    np.testing.assert_allclose(total, scored.margins, atol=1e-9)
    # The model the run keeps: as many trees as the in-process best validation count.
    kept, curve = keep_best(fitted, bits, val, y)
    count = best_count(fitted.model, {s: x[val] for s, x in xs.items()}, y[val],
                       {s: x[train] for s, x in xs.items()})
    assert len(kept.model.trees) == count == next(r["trees"] for r in curve if r.get("kept"))
    # One silo's endpoint alone: one message per request, the same answer.
    name = next(iter(silos))
    one = silos[name].histograms(msg.HistogramRequest(
        tree=2, nodes=(msg.NodeRows(node=0, rows=np.arange(len(train))),)))
    assert one.nodes[0].g.shape == (features[name], params.bins)


def test_the_run_keeps_the_trees_of_the_best_validation_loss(federation) -> None:
    """Trees fitted to noise (labels independent of the features, lr 1, no weight floor):
    validation loss rises after the first trees, and the model scored is cut there; the
    curve marks the kept count, whose loss is the lowest of the curve."""
    fed, grid, xs = federation
    n = len(next(iter(xs.values())))
    rng = np.random.default_rng(1)
    announce_run(grid, "run3")
    train, val = np.arange(0, n, 2), np.arange(1, n, 2)
    y = (rng.random(n) < 0.3).astype(np.float64)
    params = gbdt.GbdtParams(trees=8, depth=3, bins=16, lr=1.0, min_child_weight=0.0)
    silos = FlowerSilos(fed, start(fed, "run3", params.bins, train, trees=params.trees,
                                   depth=params.depth), route_positions=np.arange(n))
    fitted = fit(silos, y[train], 0.0, params)
    bits = route(fitted.model, silos)
    kept, curve = keep_best(fitted, bits, val, y)
    assert 1 <= len(kept.model.trees) < params.trees
    assert kept.model.trees == fitted.model.trees[:len(kept.model.trees)]
    best = [r for r in curve if r.get("kept")]
    assert len(best) == 1
    assert best[0]["val_loss"] == min(r["val_loss"] for r in curve)
    assert curve[-1]["trees"] == params.trees
    assert curve[-1]["val_loss"] > best[0]["val_loss"]
    margins = score(kept, bits, n, train, val, y).margins
    local = {s: GbdtSilo(s, x, bins=params.bins) for s, x in xs.items()}
    np.testing.assert_allclose(margins, gbdt.predict_trees(kept.model, local, n))


def test_silo_handlers_refuse_malformed_requests(federation) -> None:
    fed, grid, _ = federation
    announce_run(grid, "run2")
    with pytest.raises(FederationError, match="binning must be one of"):
        start(fed, "run2", 8, np.arange(20), binning="median")
    start(fed, "run2", 8, np.arange(20), trees=1, depth=1)
    silos = FlowerSilos(fed, dict.fromkeys(fed.silos, 1))
    name = fed.silos[0]
    with pytest.raises(FederationError, match="split outside"):
        silos.splits_all({name: [msg.SplitRequest(tree=0, node=0, feature=999, bin=0,
                                                  rows=np.arange(5))]})
    silos.send_gradients(msg.Gradients(tree=0, g=np.zeros(20), h=np.ones(20)))
    with pytest.raises(FederationError, match="rows outside"):
        silos.histograms_all(msg.HistogramRequest(tree=0, nodes=(
            msg.NodeRows(node=0, rows=np.array([0, 10_000])),)))
    with pytest.raises(FederationError, match="no gradients for tree 5"):
        silos.histograms_all(msg.HistogramRequest(tree=5, nodes=(
            msg.NodeRows(node=0, rows=np.arange(3)),)))
    silos.send_gradients(msg.Gradients(tree=1, g=np.zeros(19), h=np.ones(19)))
    with pytest.raises(FederationError, match="one value per row"):
        silos.histograms_all(msg.HistogramRequest(tree=1, nodes=(
            msg.NodeRows(node=0, rows=np.arange(3)),)))


# ---- a deviating authority: the run's announced mode and the silo's policy ----------------
# Each attack sends exactly the messages a deviating authority would (built as
# server/gbdt_run.py builds them), first with the silo's new check taken out (it is answered,
# and the answer shows what leaks), then as the silo answers now (REFUSED, naming the problem).


def ask(grid: AppGrid, silo: int, message_type: str, content: RecordDict) -> Message:
    """One message straight to one silo's ClientApp (node id 1..3), as a deviating authority
    may send anything."""
    msg = Message(content, dst_node_id=silo, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = f"{next(_ids):064x}"
    return grid.app(msg, grid.contexts[silo])


def refused(reply: Message, *needles: str) -> str:
    assert reply.has_error(), "the silo answered a request it must refuse"
    assert reply.error.code == m.REFUSED, reply.error.reason
    for needle in needles:
        assert needle in reply.error.reason, reply.error.reason
    return reply.error.reason


def tree_start(run: str, positions: np.ndarray, binning: str = "uniform", bins: int = 32,
               trees: int = 4, depth: int = 3) -> RecordDict:
    """A `query.gbdt_start` (the trees and depth a SecureBoost run announces ride on it)."""
    return m.make_content({"run": run, "bins": bins, "binning": binning, "trees": trees,
                           "depth": depth}, positions=positions.astype(np.int64))


def level_request(tree: int, groups: list[np.ndarray], rows: int) -> RecordDict:
    """A level's histogram request with the tree's g, h riding on it: g = 0, h = 1 on every
    row, so each per-bin h sum is a count of the node's people in that bin."""
    return m.make_content({"tree": tree}, g=np.zeros(rows), h=np.ones(rows),
                          nodes=np.arange(len(groups), dtype=np.int64),
                          rows=np.concatenate(groups).astype(np.int64),
                          sizes=np.array([len(r) for r in groups], dtype=np.int64))


@pytest.fixture
def policy(federation):
    """Write a silo policy for one test (every silo); the open one is back afterwards."""
    root = federation[1].root

    def write(**values) -> None:
        for silo in federation[0].silos:
            SiloPolicy(**values).write(root / silo)

    yield write
    write(min_group=1, explain=MAX_REASONS, require_secure_sum=False)


def test_quantile_bins_in_a_dp_run_are_refused(federation, monkeypatch) -> None:
    """An authority that announced a DP tree run (epsilon 1), then asks for quantile bins: the
    silo's bin edges would follow its people's values, so the routing bit at the middle bin
    is "at or below this column's median": a data-dependent release no accounting covers."""
    _, grid, xs = federation
    n = len(xs["payments"])
    train = np.arange(0, n, 2, dtype=np.int64)
    announce_run(grid, "dpquant", epsilon=1.0)
    route_mid = m.make_content(features=np.array([0], dtype=np.int64),
                               bins=np.array([15], dtype=np.int64), positions=train)
    with monkeypatch.context() as old:  # the mechanism: a silo that takes binning on its word
        old.setattr(run_checks, "check_tree_start",
                    lambda node, run, binning: run_checks.pinned(node)[1])
        assert not ask(grid, 1, msg.START, tree_start("dpquant", train, "quantile")).has_error()
        left = np.unpackbits(m.get_array(ask(grid, 1, msg.ROUTE, route_mid), "left", np.uint8,
                                         2), axis=1)[0, :len(train)]
        column = xs["payments"][train, 0]
        np.testing.assert_array_equal(left, column <= np.quantile(column, 0.5,
                                                                  method="inverted_cdf"))
    reason = refused(ask(grid, 1, msg.START, tree_start("dpquant", train, "quantile")),
                     "binning=quantile", "privacy.epsilon=1")
    assert "a DP run bins uniformly" in reason
    assert not ask(grid, 1, msg.START, tree_start("dpquant", train)).has_error()  # uniform


def test_secureboost_requests_in_a_dp_run_are_refused(federation, monkeypatch) -> None:
    """In a run announced at epsilon 1 (the DP trees: start, then routing only), the
    authority asks SecureBoost's per-bin sums and a partition: exact counts of the training
    people in every bin of every column, and everyone's bit, released without noise."""
    _, grid, xs = federation
    n = len(xs["payments"])
    train = np.arange(n, dtype=np.int64)
    announce_run(grid, "dplevel", epsilon=1.0)
    assert not ask(grid, 1, msg.START, tree_start("dplevel", train)).has_error()
    level = level_request(0, [np.arange(n)], n)
    split = m.make_content({"tree": 0}, nodes=np.array([0], dtype=np.int64),
                           features=np.array([0], dtype=np.int64),
                           bins=np.array([15], dtype=np.int64), rows=np.arange(n, dtype=np.int64),
                           sizes=np.array([n], dtype=np.int64))
    with monkeypatch.context() as old:  # the mechanism: no mode check (nor the trees' caps)
        old.setattr(run_checks, "check_request", lambda node, message_type: RunMode("gbdt"))
        old.setattr(tree_caps, "check_level", lambda *a: None)
        old.setattr(tree_caps, "check_split", lambda *a: None)
        counts = m.get_array(ask(grid, 1, msg.LEVEL, level), "h", np.float64, 3)[0]
        exact = Binning(32).apply(xs["payments"])
        np.testing.assert_array_equal(counts[0], np.bincount(exact[:, 0], minlength=32))
        assert not ask(grid, 1, msg.SPLIT, split).has_error()
    refused(ask(grid, 1, msg.LEVEL, level), msg.LEVEL, "non-private run only",
            "privacy.epsilon=1")
    refused(ask(grid, 1, msg.SPLIT, split), msg.SPLIT, "non-private run only")


def test_a_start_for_another_run_key_is_refused(federation) -> None:
    """The trees' answers are judged by the mode pinned with the announced run key: a start
    naming another key (one announced without DP, say) is refused."""
    _, grid, xs = federation
    announce_run(grid, "announced", epsilon=1.0)
    train = np.arange(len(xs["payments"]), dtype=np.int64)
    refused(ask(grid, 1, msg.START, tree_start("other", train, "quantile")),
            "names run other", "aligned for run announced")


def test_tree_aggregates_over_a_few_people_are_refused(federation, policy, monkeypatch
                                                       ) -> None:
    """min_group for the trees: per-bin sums of a one-person node are that person's bin in
    every column (h = 1 counts them); so is one person listed many times; a partition of a
    one-person node is their bit; a run over three training people bins and sums over three."""
    _, grid, xs = federation
    n = len(xs["payments"])
    announce_run(grid, "fewpeople")
    assert not ask(grid, 1, msg.START, tree_start("fewpeople", np.arange(n))).has_error()
    one = level_request(0, [np.array([5])], n)
    # The mechanism: a silo that allows groups of one (and no caps: a root of one person).
    policy(min_group=1, require_secure_sum=False)
    with monkeypatch.context() as old:
        old.setattr(tree_caps, "check_level", lambda *a: None)
        h = m.get_array(ask(grid, 1, msg.LEVEL, one), "h", np.float64, 3)[0]
    np.testing.assert_array_equal(h.argmax(axis=1), Binning(32).apply(xs["payments"])[5])
    assert (h.sum(axis=1) == 1).all()
    # The default minimum group of 100 distinct people.
    policy(require_secure_sum=False)
    refused(ask(grid, 1, msg.LEVEL, one), "'min_group'", "node 0 over 1 distinct people")
    repeated = level_request(0, [np.full(150, 5)], n)
    refused(ask(grid, 1, msg.LEVEL, repeated), "listed more than once")
    split = m.make_content({"tree": 0}, nodes=np.array([3], dtype=np.int64),
                           features=np.array([0], dtype=np.int64),
                           bins=np.array([15], dtype=np.int64), rows=np.array([5], np.int64),
                           sizes=np.array([1], dtype=np.int64))
    refused(ask(grid, 1, msg.SPLIT, split), "partition of node 3 over 1 distinct people")
    refused(ask(grid, 1, msg.START, tree_start("fewpeople", np.arange(3))),
            "the training positions over 3 distinct people")
    # Nodes of at least 100 people are answered (the root: every training row).
    assert not ask(grid, 1, msg.LEVEL, level_request(0, [np.arange(n)], n)).has_error()


class _SizeTap(GbdtSilo):
    """A silo that records the size of every node it is asked about."""

    sizes: list[int]

    def histograms(self, m_: msg.HistogramRequest) -> msg.HistogramReply:
        self.sizes += [len(n.rows) for n in m_.nodes]
        return super().histograms(m_)

    def split(self, m_: msg.SplitRequest) -> msg.SplitReply:
        self.sizes.append(len(m_.rows))
        return super().split(m_)


def test_secureboost_nodes_hold_at_least_four_times_min_child_weight() -> None:
    """What policy_for's min_group for the trees rests on: a node's hessian is at least
    min_child_weight and one person's at most 1/4 (also under randomised response), so every
    node a silo is asked about holds at least 4 x min_child_weight people."""
    x, y = credit_like(8000, seed=21)
    y_view = randomized_response(y.astype(np.int8), 2.0, np.random.default_rng(2))
    sizes: list[int] = []
    silos = {}
    for name, part in by_silo(x).items():
        silos[name] = _SizeTap(name, part, bins=16)
        silos[name].sizes = sizes
    fit(silos, y_view.astype(np.float64), flip_probability(2.0),
        gbdt.GbdtParams(trees=3, depth=5, bins=16, min_child_weight=5.0))
    assert len(sizes) > 20
    assert 4 * 5.0 <= min(sizes) < 100  # the floor holds, and below the default min_group


# ---- what a silo learns of the labels ------------------------------------------------------


class GradientTap:
    """A silo endpoint that keeps every gradient message it receives."""

    def __init__(self, silo: GbdtSilo, seen: list[msg.Gradients]) -> None:
        self.silo, self.seen = silo, seen

    @property
    def features(self) -> int:
        return self.silo.features

    def gradients(self, m_: msg.Gradients | msg.EncryptedGradients) -> None:
        assert isinstance(m_, msg.Gradients)
        self.seen.append(m_)
        self.silo.gradients(m_)

    def histograms(self, m_: msg.HistogramRequest) -> msg.HistogramReply:
        return self.silo.histograms(m_)

    def split(self, m_: msg.SplitRequest) -> msg.SplitReply:
        return self.silo.split(m_)

    def route(self, m_: msg.RouteRequest) -> msg.RouteReply:
        return self.silo.route(m_)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0, math.inf])
def test_a_silo_guesses_labels_from_g_no_better_than_rr_allows(epsilon: float) -> None:
    """A curious silo's best guess of y from what it receives (g's sign gives the RR label
    exactly, and the RR label is all g depends on) is right e^eps / (1 + e^eps) of the time,
    in every tree; with protection off (label eps inf) it is right every time."""
    x, y = credit_like(8000, seed=21)
    rng = np.random.default_rng(int(epsilon * 10) if math.isfinite(epsilon) else 99)
    y_view = randomized_response(y.astype(np.int8), epsilon, rng).astype(np.float64)
    rho = flip_probability(epsilon)
    seen: list[msg.Gradients] = []
    silos = {name: GradientTap(GbdtSilo(name, part, bins=16), seen)
             for name, part in by_silo(x).items()}
    fit(silos, y_view, rho, gbdt.GbdtParams(trees=4, depth=3, bins=16))
    bound = keep_probability(epsilon)
    slack = 4 * math.sqrt(bound * (1 - bound) / len(y)) + 1e-12
    assert len(seen) == 4 * 3
    for m_ in seen:
        guess = (m_.g < 0).astype(np.float64)
        assert np.array_equal(guess, y_view)  # g carries the RR label, nothing more
        accuracy = float((guess == y).mean())
        if math.isinf(epsilon):
            assert accuracy == 1.0
        else:
            assert accuracy <= bound + slack
            assert accuracy >= bound - slack  # the bound is what RR gives, not more


def test_rr_gradients_reduce_to_logistic_loss_and_keep_hessians_positive() -> None:
    rng = np.random.default_rng(4)
    margin = rng.normal(0, 2, 500)
    y = (rng.random(500) < 0.3).astype(np.float64)
    g, h = rr_gradients(margin, y, 0.0)
    g0, h0 = gbdt.gradients(margin, y)
    np.testing.assert_array_equal(np.stack([g, h]), np.stack([g0, h0]))
    for rho in (0.05, 0.27, 0.45):
        g, h = rr_gradients(margin, y, rho)
        assert (h > 0).all()
        assert np.isfinite(g).all()
        # The first margin: the clean default rate, estimated back from the RR labels.
        clean = (rng.random(200_000) < 0.2).astype(np.float64)
        released = np.where(rng.random(len(clean)) < rho, 1 - clean, clean)
        assert abs(1 / (1 + np.exp(-base_margin(released, rho))) - 0.2) < 0.01
