"""A deviating authority against the real silo handlers (issue 18, items 1, 2 and the ring).

Each attack is replayed the way an authority would send it: the silos are the real ClientApp
(`make_client_app`) called with Flower Messages and Contexts in process, and the honest
authority's side is the real `Federation` (hello) and `announce` (masking keys). Every attack
first shows its mechanism (with the new check taken out, it works) and then that the silo
refuses it now, with the REFUSED code and a message naming what to change.
"""

from __future__ import annotations

import functools
import itertools
import json
import secrets
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.node import Defaults, Node
from clients.protocol import messages as m
from clients.protocol.gbdt import START
from clients.protocol.model import ModelSpec
from clients.protocol.run_mode import RunMode
from clients.protocol.schema import federation_silos
from clients.silo import alignment, run_checks, training
from clients.silo import app as ca
from clients.silo.enrolment import enrol
from clients.silo.policy import POLICY_FILE, PolicyError, SiloPolicy
from clients.silo.state import Journal, silo_matrix
from crypto import masking
from crypto.masking import PairwiseKeys, decode, mask_context, pair_mask
from crypto.roster import (
    ROSTER_FILE,
    Roster,
    RosterError,
    authority_roster,
    hello_statement,
    identity_key,
    masking_statement,
    public_hex,
    sign,
)
from server.alignment import Alignment, announce
from server.federation import Federation, FederationError
from simulations.data.population import PopulationConfig, generate, write_parties

PEOPLE = 300  # aligned positions: above the default minimum group of 100


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower stamps every message with the running task's identity; outside an app, set one.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


_ids = itertools.count(1)


def _stamp(msg: Message) -> Message:
    msg.metadata.__dict__["_message_id"] = f"{next(_ids):064x}"
    return msg


@functools.cache
def _population():
    return generate(PopulationConfig(users=1000, seed=11))


class AppGrid:
    """A grid whose nodes are the real ClientApp, one Context per node (its silo's state)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.app = ca.make_client_app(root, None, plaintext=True)
        self.silos = federation_silos(root)
        self.contexts = {n + 1: _context(n) for n in range(len(self.silos))}
        self.replies: dict[str, Message] = {}

    def context(self, silo: str) -> Context:
        return self.contexts[self.silos.index(silo) + 1]

    def restart(self, silo: str) -> None:
        """The silo's process starts again: its in-memory state is gone, its files stay."""
        self.contexts[self.silos.index(silo) + 1] = _context(self.silos.index(silo))

    def send(self, silo: str, message_type: str, content: RecordDict) -> Message:
        """One message straight to a silo, as a deviating authority may send anything."""
        msg = _stamp(Message(content, dst_node_id=self.silos.index(silo) + 1,
                             message_type=message_type))
        return self.app(msg, self.context(silo))

    # the Grid calls Federation makes
    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, msgs):
        ids = []
        for msg in msgs:
            _stamp(msg)
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            self.replies[msg.metadata.message_id] = self.app(msg, self.contexts[node])
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition},
                   state=RecordDict(), run_config={})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    parties = tmp_path / "parties"
    write_parties(_population(), parties)
    enrol(parties, federation_silos(parties), None)  # the strict default policy
    return parties


@pytest.fixture
def grid(root: Path) -> AppGrid:
    return AppGrid(root)


def _model_config(run_key: str, *, secure: bool = True, outputs: int = 1) -> dict:
    spec = ModelSpec(hidden=(4,), lr=0.01, seed=0, outputs=outputs)
    return {**spec.to_config(), "run": run_key, "secure": secure}


def _aligned(grid: AppGrid, *, secure: bool = True) -> tuple[Federation, str]:
    """The honest authority: authenticated hello, alignment and relayed signed keys."""
    fed = Federation(grid, grid.silos, roster=authority_roster(grid.root))
    fed.connect()
    run_key = secrets.token_hex(8)
    rows = np.arange(PEOPLE, dtype=np.int64)
    announce(fed, Alignment(rows, dict.fromkeys(grid.silos, rows), {}),
             _model_config(run_key, secure=secure))
    return fed, run_key


def _refused(reply: Message, *needles: str) -> str:
    assert reply.has_error(), "the silo answered a request it must refuse"
    assert reply.error.code == m.REFUSED, reply.error.reason
    for needle in needles:
        assert needle in reply.error.reason, reply.error.reason
    return reply.error.reason


def _step(round_: int, *, plan=None, eval_=None, summary=False, explain=0, done=None
          ) -> RecordDict:
    """A train.step; `done` (the previous plan) adds a gradient for it, so the model moves
    off its initialisation (whose contributions are all zero)."""
    extras = {}
    if done is not None:
        extras = {"done_plan": done, "done_sizes": np.array([len(done)], dtype=np.int64),
                  "grad": np.random.default_rng(round_).normal(size=len(done)).astype(np.float32)}
    return m.make_content({"round": round_, "summary": summary, "explain": explain},
                          plan=plan, eval=eval_, **extras)


@pytest.fixture
def released(monkeypatch) -> list[np.ndarray]:
    """What each silo masked, in the order masked: the exact contributions an attack wants."""
    seen: list[np.ndarray] = []
    real = training.masked_share

    def spy(values, me, shared, context):
        seen.append((me, np.asarray(values, dtype=np.float64).copy()))
        return real(values, me, shared, context)

    monkeypatch.setattr(training, "masked_share", spy)
    return seen


# ---- 1. key substitution and the short peer list ----------------------------------------------


def _substituted_peers(grid: AppGrid, victim: str, silos: list[str]
                       ) -> tuple[RecordDict, dict[str, PairwiseKeys]]:
    """The authority's peer list for `victim`: its real, signed key as relayed, and keys of the
    authority's own for `silos` (signed with nothing the roster pins: it holds no silo's
    identity key)."""
    own = PairwiseKeys(bytes(grid.context(victim).state["mask"]["secret"]))
    fake = {s: PairwiseKeys() for s in silos}
    run_key = str(grid.context(victim).state["model"]["run"])
    real_sig = sign(identity_key(grid.root / victim, victim), masking_statement(
        authority_roster(grid.root).fingerprint, run_key, victim, own.public))
    config = {f"peer.{victim}": own.public, f"sig.{victim}": real_sig}
    for s, k in fake.items():
        config[f"peer.{s}"] = k.public
        config[f"sig.{s}"] = b"\0" * 64
    return m.make_content(config), fake


def _unmask(share: np.ndarray, victim: str, fake: dict[str, PairwiseKeys], victim_public: bytes,
            context: bytes) -> np.ndarray:
    """What the authority reads from the victim's share when it holds every pairwise secret."""
    ring = share.copy()
    for peer, key in fake.items():
        mask = pair_mask(key.shared_with(victim_public), context, len(ring))
        ring = ring - mask if victim < peer else ring + mask
    return decode(ring)


def test_key_substitution_unmasks_a_silo_without_the_roster_and_is_refused(
        grid: AppGrid, released, monkeypatch):
    _, run_key = _aligned(grid)
    victim, others = "payments", ["social", "device"]
    victim_public = PairwiseKeys(bytes(grid.context(victim).state["mask"]["secret"])).public

    # The mechanism (the old silo checked only its own key): the authority puts keys of its own
    # in the other silos' places and reads the victim's exact contributions from its share.
    with monkeypatch.context() as old:
        old.setattr(alignment, "_checked_peers", _own_key_only)
        content, fake = _substituted_peers(grid, victim, others)
        assert not grid.send(victim, m.PEERS, content).has_error()
        first = np.arange(50, dtype=np.int64)
        grid.send(victim, m.STEP, _step(1, plan=first))
        step = _step(2, plan=np.arange(50, 100, dtype=np.int64), done=first)
        reply = grid.send(victim, m.STEP, step)
        share = m.get_array(reply, "plan", np.uint64, 1)
        ctx = mask_context(run_key, 2, "plan", m.content_digest(step))
        stolen = _unmask(share, victim, fake, victim_public, ctx)
        exact = released[-1][1]
        np.testing.assert_allclose(stolen, exact, atol=2.0 ** -masking.FRACTION_BITS)
        assert np.abs(exact).max() > 1e-3  # real contributions, not zeros

    # Now: a fresh run (the substituted keys are refused before any share is made).
    grid = AppGrid(grid.root)
    _aligned(grid)
    honest = dict(grid.context(victim).state["mask"])
    content, _ = _substituted_peers(grid, victim, others)
    _refused(grid.send(victim, m.PEERS, content), "silo 'social' does not verify under its "
             "roster key")
    assert dict(grid.context(victim).state["mask"]) == honest  # nothing replaced

    # A signature is bound to its run: social's real key, signed by social for another run,
    # is refused (device's entry is honest here).
    roster = authority_roster(grid.root)
    run_key = str(grid.context(victim).state["model"]["run"])
    config = m.get_config(Message(content, dst_node_id=1, message_type=m.PEERS))
    for silo, run in (("social", "otherrun"), ("device", run_key)):
        key = PairwiseKeys(bytes(grid.context(silo).state["mask"]["secret"])).public
        config[f"peer.{silo}"] = key
        config[f"sig.{silo}"] = sign(identity_key(grid.root / silo, silo), masking_statement(
            roster.fingerprint, run, silo, key))
    _refused(grid.send(victim, m.PEERS, m.make_content(config)), "silo 'social'")
    config["sig.social"] = sign(identity_key(grid.root / "social", "social"),
                                masking_statement(roster.fingerprint, run_key, "social",
                                                     config["peer.social"]))
    assert not grid.send(victim, m.PEERS, m.make_content(config)).has_error()  # the honest list


def _own_key_only(roster, run_key, me, own_public, publics, signatures) -> None:
    """The check the silo made before issue 18: its own key is in the list, nothing else."""
    if publics.get(me) != own_public:
        raise m.ProtocolError("the relayed key for this silo is not its own")


def test_a_short_peer_list_is_refused(grid: AppGrid, monkeypatch):
    _aligned(grid)
    victim = "payments"
    own = PairwiseKeys(bytes(grid.context(victim).state["mask"]["secret"]))
    authority = PairwiseKeys()
    short = m.make_content({f"peer.{victim}": own.public, "peer.social": authority.public})
    # Old behaviour: accepted, and the victim's only mask is shared with the authority.
    with monkeypatch.context() as old:
        old.setattr(alignment, "_checked_peers", _own_key_only)
        assert not grid.send(victim, m.PEERS, short).has_error()
        assert [k for k in grid.context(victim).state["mask"] if k.startswith("peer.")] == \
            ["peer.social"]
    reason = _refused(grid.send(victim, m.PEERS, short), "not the federation's roster",
                      "missing device")
    assert authority.public.hex() not in reason


def test_the_honest_relay_is_accepted_and_the_masks_cancel(grid: AppGrid, released):
    fed, _ = _aligned(grid)
    first, plan = np.arange(40, dtype=np.int64), np.arange(40, 80, dtype=np.int64)
    fed.exchange(m.STEP, dict.fromkeys(grid.silos, _step(1, plan=first)))
    released.clear()
    replies = fed.exchange(m.STEP, dict.fromkeys(grid.silos, _step(2, plan=plan, done=first)))
    total = decode(masking.ring_sum([m.get_array(r, "plan", np.uint64, 1)
                                     for r in replies.values()]))
    exact = np.sum([v for _, v in released], axis=0)
    assert np.abs(exact).max() > 1e-3
    np.testing.assert_allclose(total, exact, atol=1e-5)
    # Each share alone is no silo's contribution.
    assert np.abs(decode(m.get_array(replies["payments"], "plan", np.uint64, 1))).max() > 1e6


# ---- hello: a node proves which silo it is ------------------------------------------------------


def test_hello_is_answered_with_a_signature_under_the_roster(grid: AppGrid):
    fed = Federation(grid, grid.silos, roster=authority_roster(grid.root))
    info = fed.connect()
    assert set(info) == set(grid.silos)
    assert fed.nodes == {s: i + 1 for i, s in enumerate(grid.silos)}


class ForgingGrid(AppGrid):
    """Node 1 answers hello claiming to be `claim`, with whatever signature `forge` makes."""

    def __init__(self, root: Path, claim: str, forge) -> None:
        super().__init__(root)
        self.claim, self.forge = claim, forge

    def push_messages(self, msgs):
        ids = super().push_messages(msgs)
        for msg, i in zip(msgs, ids, strict=True):
            if msg.metadata.dst_node_id == 1 and msg.metadata.message_type == m.HELLO:
                challenge = bytes(m.get_config(msg)["challenge"])
                cfg = m.get_config(self.replies[i])
                cfg.update(silo=self.claim, signature=self.forge(challenge))
                self.replies[i] = Message(m.make_content(cfg), reply_to=msg)
        return ids


def test_a_node_cannot_claim_another_silos_name(root: Path):
    roster = authority_roster(root)
    social_key = identity_key(root / "social", "social")
    # payments' node claims to be social, signing with its own identity key: refused.
    own = identity_key(root / "payments", "payments")
    grid = ForgingGrid(root, "social", lambda c: sign(own, hello_statement(
        roster.fingerprint, c, "social")))
    with pytest.raises(FederationError, match="node 1 is not silo 'social'"):
        Federation(grid, grid.silos, roster=roster).connect()
    # A signature social made for an earlier challenge does not answer a fresh one.
    old = sign(social_key, hello_statement(roster.fingerprint, b"x" * 32, "social"))
    grid = ForgingGrid(root, "social", lambda c: old)
    with pytest.raises(FederationError, match="not silo 'social'"):
        Federation(grid, grid.silos, roster=roster).connect()
    # Without the roster check (the old authority) the same claim went through unnoticed.
    grid = ForgingGrid(root, "social", lambda c: b"")
    with pytest.raises(FederationError, match="two SuperNodes claim silo 'social'"):
        Federation(grid, grid.silos, roster=None).connect()  # only a name clash, by chance


def test_an_unenrolled_silo_is_not_taken_at_its_word(grid: AppGrid):
    (grid.root / "device" / ROSTER_FILE).unlink()
    with pytest.raises(FederationError, match="claims silo 'device' without proving it"):
        Federation(grid, grid.silos, roster=authority_roster(grid.root)).connect()
    # Another roster than the authority's (another federation's enrolment) is refused too.
    grid = AppGrid(grid.root)
    enrol(grid.root / "elsewhere", grid.silos, grid.root / "elsewhere-keys")
    with pytest.raises(FederationError, match="holds another roster than the authority"):
        Federation(grid, grid.silos,
                   roster=authority_roster(grid.root / "elsewhere")).connect()


def test_a_silo_takes_its_name_from_its_own_config(grid: AppGrid):
    reply = grid.send("social", m.HELLO, m.make_content({"challenge": b"c" * 32,
                                                         "silo": "payments"}))
    assert m.get_config(reply)["silo"] == "social"


# ---- the roster itself ------------------------------------------------------------------------


def test_rosters_with_duplicates_or_edits_are_refused(root: Path):
    roster = authority_roster(root)
    text = roster.to_json()
    assert Roster.from_json(text) == roster
    assert json.loads((root / "payments" / ROSTER_FILE).read_text())["fingerprint"] == \
        roster.fingerprint
    payments = roster.silos["payments"]
    doubled = (f'{{"version": 1, "silos": {{"payments": "{payments}", "payments": '
               f'"{roster.silos["social"]}", "social": "{roster.silos["device"]}"}}}}')
    with pytest.raises(RosterError, match="names a key twice"):
        Roster.from_json(doubled)
    with pytest.raises(RosterError, match="share one identity key"):
        Roster({"payments": payments, "social": payments})
    edited = json.loads(text)
    edited["silos"]["device"] = public_hex(identity_key(root / "payments", "other"))
    with pytest.raises(RosterError, match="fingerprint does not match"):
        Roster.from_json(json.dumps(edited))
    # The identity key file is the party's own secret.
    assert (root / "payments" / "identity-payments.key").stat().st_mode & 0o077 == 0


def test_a_silo_refuses_a_roster_that_does_not_pin_its_own_key(grid: AppGrid):
    path = grid.root / "payments" / ROSTER_FILE
    roster = Roster.load(path)
    swapped = dict(roster.silos, payments=public_hex(identity_key(grid.root, "intruder")))
    Roster(swapped).write(path)
    reply = grid.send("payments", m.HELLO, m.make_content({"challenge": b"c" * 32}))
    assert reply.has_error()
    assert "does not pin this silo's identity key" in reply.error.reason


# ---- 2. silo policy ------------------------------------------------------------------------------


def _policy(root: Path, silo: str, **values) -> None:
    (root / silo / POLICY_FILE).write_text(json.dumps(values))


def test_a_one_person_summary_is_refused(grid: AppGrid, monkeypatch):
    _aligned(grid)
    one = _step(1, eval_=np.array([5], dtype=np.int64), summary=True)
    seen = []
    real = training.contribution_summary
    monkeypatch.setattr(training, "contribution_summary",
                        lambda values, rng: seen.append(values.copy()) or real(values, rng))
    # The mechanism: a silo that allows groups of one answers with that person's contribution
    # (no DP here: the "mean" is the centre of the one bin it falls in).
    _policy(grid.root, "payments", min_group=1)
    reply = grid.send("payments", m.STEP, one)
    assert not reply.has_error(), reply.error.reason
    mean = m.get_config(reply)["summary.mean"]
    edges = training.SUMMARY_EDGES
    assert abs(mean - float(seen[0][0])) <= (edges[1] - edges[0]) / 2

    # The default policy: refused, for one person and for one person listed 200 times.
    grid = AppGrid(grid.root)
    (grid.root / "payments" / POLICY_FILE).unlink()
    _aligned(grid)
    reason = _refused(grid.send("payments", m.STEP, one), "'min_group'", "1 distinct people",
                      "minimum group of 100", POLICY_FILE)
    assert "can change 'min_group'" in reason
    repeated = _step(1, eval_=np.full(200, 5, dtype=np.int64), summary=True)
    _refused(grid.send("payments", m.STEP, repeated), "listed more than once")
    # A summary over enough distinct people is answered.
    fine = _step(1, eval_=np.arange(PEOPLE, dtype=np.int64), summary=True)
    assert not grid.send("payments", m.STEP, fine).has_error()


def test_one_row_aligned_at_many_positions_is_refused(grid: AppGrid):
    """The min_group bypass: align one person at 300 positions, then ask a summary over 200
    "distinct" positions. The silo refuses the alignment itself."""
    fed = Federation(grid, grid.silos, roster=authority_roster(grid.root))
    fed.connect()
    rows = np.arange(PEOPLE, dtype=np.int64)
    per_silo = {**dict.fromkeys(grid.silos, rows), "payments": np.full(PEOPLE, 5, np.int64)}
    with pytest.raises(FederationError, match="one of this silo's rows to several positions"):
        announce(fed, Alignment(rows, per_silo, {}), _model_config(secrets.token_hex(8)))


def test_reason_codes_and_corrections_follow_the_silo_policy(grid: AppGrid):
    _aligned(grid)
    everyone = np.arange(PEOPLE, dtype=np.int64)
    _refused(grid.send("payments", m.STEP, _step(1, eval_=everyone, explain=2)),
             "'explain'", "2 reason codes asked, this silo allows 0")
    correction = m.make_content({"field": "monthly_spend", "value": 1.0, "category": ""},
                                position=np.array([3], dtype=np.int64))
    _refused(grid.send("payments", m.CORRECT, correction), "'corrections'", "monthly_spend",
             "operator's approval")
    score = m.make_content({"request": "r1", "explain": 1}, positions=everyone[:1])
    _refused(grid.send("payments", m.SCORE, score), "'explain'")
    # A list of fields: only those.
    _policy(grid.root, "payments", corrections=["some_other_field"])
    _refused(grid.send("payments", m.CORRECT, correction), "monthly_spend")
    # What the old silo did on the authority's word alone, now only with the operator's leave:
    # per-person reason codes, and a correction recorded into every later run on this table.
    _policy(grid.root, "payments", explain=2, corrections="all")
    why = grid.send("payments", m.STEP, _step(1, eval_=everyone, explain=2))
    assert not why.has_error(), why.error.reason
    assert m.get_array(why, "reason_index").shape[0] == PEOPLE
    from clients.silo.explain import features_of

    node = Node(grid.context("payments"), Defaults(grid.root, None, True))
    field = features_of(silo_matrix(node))[0]
    fixed = grid.send("payments", m.CORRECT, m.make_content(
        {"field": field, "value": 1.0, "category": ""}, position=np.array([3], dtype=np.int64)))
    assert not fixed.has_error(), fixed.error.reason


def test_plaintext_or_split_learning_is_refused_by_default(grid: AppGrid):
    rows = np.arange(PEOPLE, dtype=np.int64)
    for config, key in ((_model_config("runa", secure=False), "'require_secure_sum'"),
                        (_model_config("runb", outputs=4), "'allow_concat'")):
        content = m.make_content({**config, "positions": PEOPLE}, rows=rows, positions=rows)
        _refused(grid.send("payments", m.ALIGN, content), key)
    _policy(grid.root, "payments", require_secure_sum=False)
    content = m.make_content({**_model_config("runc", secure=False), "positions": PEOPLE},
                             rows=rows, positions=rows)
    assert not grid.send("payments", m.ALIGN, content).has_error()


def _align(run_key: str, **mode) -> RecordDict:
    """A `query.align` as `announce` builds it, announcing `mode` (RunMode's kind, epsilon)."""
    rows = np.arange(PEOPLE, dtype=np.int64)
    return m.make_content({**_model_config(run_key, secure=False), "positions": PEOPLE,
                           **RunMode(**mode).to_config()}, rows=rows, positions=rows)


def test_a_tree_run_needs_the_operators_leave_to_answer_in_plaintext(grid: AppGrid):
    """A tree or scorecard run has no secure sum: its per-bin sums, partitions and partial
    logits reach the authority silo by silo. The strict default refuses to join one."""
    _policy(grid.root, "payments", require_secure_sum=True)
    for kind in ("gbdt", "scorecard"):
        _refused(grid.send("payments", m.ALIGN, _align("runt", kind=kind)),
                 "'require_secure_sum'", f"model.kind={kind} run sends this silo's answers")
    _policy(grid.root, "payments", require_secure_sum=False)
    assert not grid.send("payments", m.ALIGN, _align("runt", kind="gbdt")).has_error()


def test_a_run_key_keeps_the_mode_it_was_announced_with(grid: AppGrid, monkeypatch):
    """The authority announces a DP tree run, then aligns the same run key again as a
    non-private one, so that quantile bins (data-dependent edges) pass under the DP run's
    name. The silo holds the run key to its first announcement."""
    _policy(grid.root, "payments", require_secure_sum=False)
    dp, plain = _align("rund", kind="gbdt", epsilon=1.0), _align("rund", kind="gbdt")
    quantile = m.make_content({"run": "rund", "bins": 32, "binning": "quantile", "trees": 2,
                               "depth": 2},
                              positions=np.arange(PEOPLE, dtype=np.int64))
    assert not grid.send("payments", m.ALIGN, dp).has_error()
    with monkeypatch.context() as old:  # the mechanism: a silo that pins nothing per run key
        old.setattr(run_checks, "check_same_mode", lambda directory, run_key, mode: None)
        assert not grid.send("payments", m.ALIGN, plain).has_error()
        assert not grid.send("payments", START, quantile).has_error()
        assert not grid.send("payments", m.ALIGN, dp).has_error()  # back, for the check below
    _refused(grid.send("payments", m.ALIGN, plain), "run rund was announced as model.kind=gbdt "
             "at privacy.epsilon=1", "a run key names one configuration")
    _refused(grid.send("payments", START, quantile), "binning=quantile")  # still the DP run


def test_a_model_json_without_a_mode_pins_nothing(tmp_path: Path):
    """A run's model.json from before modes were announced holds no mode to keep: the run key
    is taken at its new announcement (a mode written since is held)."""
    (tmp_path / "model.json").write_text(json.dumps({"run": "runo", "noise_multiplier": 0.0}))
    run_checks.check_same_mode(tmp_path, "runo", RunMode("gbdt"))
    (tmp_path / "model.json").write_text(json.dumps({"run": "runo", "kind": "gbdt",
                                                     "epsilon": 1.0}))
    run_checks.check_same_mode(tmp_path, "runo", RunMode("gbdt", 1.0))
    with pytest.raises(run_checks.RunModeRefusalError, match=r"announced as model\.kind=gbdt"):
        run_checks.check_same_mode(tmp_path, "runo", RunMode("gbdt"))


def test_a_tree_run_is_not_answered_mlp_steps(grid: AppGrid, monkeypatch):
    """A DP tree run announces the MLP spec of its idle DP-SGD machinery: no noise. A
    `train.step` there would train and release this silo's contributions without DP."""
    _policy(grid.root, "payments", require_secure_sum=False)
    assert not grid.send("payments", m.ALIGN, _align("runs", kind="gbdt",
                                                     epsilon=1.0)).has_error()
    assert not ModelSpec.from_config(dict(grid.context("payments").state["model"])).dp
    plan = _step(1, plan=np.arange(50, dtype=np.int64))
    with monkeypatch.context() as old:  # the mechanism: no mode check
        old.setattr(run_checks, "check_request", lambda node, message_type: RunMode())
        assert m.get_array(grid.send("payments", m.STEP, plan), "plan").shape == (50,)
    _refused(grid.send("payments", m.STEP, _step(2, plan=np.arange(50, dtype=np.int64))),
             "train.step is no request of a model.kind=gbdt run")


def test_a_second_summary_in_a_run_is_refused(grid: AppGrid, released, monkeypatch):
    """Differencing: two summaries, over everyone and over everyone but one person, at the
    same model (the third step sends no gradient). Without DP-SGD they are exact, and
    N x mean - (N - 1) x mean' is that person's contribution to within a bin. The silo
    answers one summary per run."""
    def attack(grid: AppGrid) -> tuple[Message, Message]:
        _aligned(grid)
        first = np.arange(50, dtype=np.int64)
        grid.send("payments", m.STEP, _step(1, plan=first))
        everyone = np.arange(PEOPLE, dtype=np.int64)
        one = grid.send("payments", m.STEP, _step(2, eval_=everyone, summary=True, done=first))
        assert not one.has_error(), one.error.reason
        return one, grid.send("payments", m.STEP, _step(3, eval_=everyone[1:], summary=True))

    with monkeypatch.context() as old:  # the mechanism: a silo that answers every summary
        old.setattr(training, "_check_one_summary", lambda journal, binding: None)
        old.setattr(training, "_record_summary", lambda journal, binding: None)
        one, two = attack(grid)
        means = [m.get_config(r)["summary.mean"] for r in (one, two)]
        stolen = PEOPLE * means[0] - (PEOPLE - 1) * means[1]
        exact = next(v for who, v in released if who == "payments" and len(v) == PEOPLE)[0]
        assert abs(stolen - exact) <= training.SUMMARY_EDGES[1] - training.SUMMARY_EDGES[0]
        assert abs(exact) > 1e-3  # a contribution the gradient moved, not the zero start
    one, two = attack(AppGrid(grid.root))
    _refused(two, "a contribution summary was answered already in this run")


@pytest.mark.parametrize(("text", "needle"), [
    ('{"min_group": 0}', "min_group=0"),
    ('{"explain": -1}', "explain=-1"),
    ('{"corrections": "some"}', "corrections='some'"),
    ('{"require_secure_sum": "yes"}', "true or false"),
    ('{"min_groups": 5}', "unknown key(s) min_groups"),
    ('[1]', "an object of policy keys"),
    ('{"min_group": NaN}', "not valid JSON"),
])
def test_a_malformed_policy_is_a_clear_error(tmp_path: Path, text: str, needle: str):
    (tmp_path / POLICY_FILE).write_text(text)
    with pytest.raises(PolicyError) as info:
        SiloPolicy.load(tmp_path)
    assert needle in str(info.value)
    assert str(tmp_path) in str(info.value)


# ---- 2. mask reuse after resume ---------------------------------------------------------------


def test_a_different_plan_for_an_answered_round_is_refused_even_after_resume(
        grid: AppGrid, released, monkeypatch):
    _, run_key = _aligned(grid)
    silo = "payments"
    plan_a = _step(1, plan=np.arange(0, 60, dtype=np.int64))
    plan_b = _step(1, plan=np.arange(60, 120, dtype=np.int64))
    first = grid.send(silo, m.STEP, plan_a)
    share_a = m.get_array(first, "plan", np.uint64, 1)
    value_a = released[-1][1]

    # The mechanism of the attack: masks bound to (run, round, purpose) only, and no memory of
    # what was answered. After `resume` the second plan gets the same masks, and the two shares
    # subtract to the difference of exact contributions.
    with monkeypatch.context() as old:
        old.setattr(Journal, "check", lambda *a, **k: None)
        old.setattr(Journal, "record", lambda *a, **k: None)
        old.setattr(training, "mask_context", lambda run, r, purpose, binding: mask_context(
            run, r, purpose, b""))
        grid.send(silo, m.RESUME, m.make_content({"run": run_key, "round": 0}))
        share_old = m.get_array(grid.send(silo, m.STEP, plan_a), "plan", np.uint64, 1)
        grid.send(silo, m.RESUME, m.make_content({"run": run_key, "round": 0}))
        share_b = m.get_array(grid.send(silo, m.STEP, plan_b), "plan", np.uint64, 1)
        value_b = released[-1][1]
        np.testing.assert_allclose(decode(share_old - share_b), value_a - value_b, atol=1e-6)
        # With the masks bound to the message alone the difference is noise, not data.
        old.setattr(training, "mask_context", mask_context)
        grid.send(silo, m.RESUME, m.make_content({"run": run_key, "round": 0}))
        share_b2 = m.get_array(grid.send(silo, m.STEP, plan_b), "plan", np.uint64, 1)
        assert np.abs(decode(share_a - share_b2)).max() > 1e6

    # Now: the journal refuses plan B for round 1, after resume and after a restart.
    grid.send(silo, m.RESUME, m.make_content({"run": run_key, "round": 0}))
    _refused(grid.send(silo, m.STEP, plan_b), "step 1 was answered already",
             "different message")
    grid.restart(silo)
    grid.send(silo, m.RESUME, m.make_content({"run": run_key, "round": 0}))
    _refused(grid.send(silo, m.STEP, plan_b), "step 1 was answered already")
    # The same message again (a lost reply) gets the same answer.
    again = grid.send(silo, m.STEP, plan_a)
    assert not again.has_error(), again.error.reason
    np.testing.assert_array_equal(m.get_array(again, "plan", np.uint64, 1), share_a)
    (journal,) = (grid.root / silo / "checkpoints" / run_key).glob("answers-*.log")
    assert len(journal.read_text().splitlines()) == 1


def test_a_new_alignment_starts_fresh_masks_and_a_fresh_journal(grid: AppGrid):
    """The run key is derived from the configuration, so a run repeated on the same parties
    aligns the same run key again: its new masking key shares no mask with the old one."""
    fed, run_key = _aligned(grid)
    silo = "payments"
    plan_a = _step(1, plan=np.arange(0, 60, dtype=np.int64))
    plan_b = _step(1, plan=np.arange(60, 120, dtype=np.int64))
    share_a = m.get_array(grid.send(silo, m.STEP, plan_a), "plan", np.uint64, 1)
    _refused(grid.send(silo, m.STEP, plan_b), "different message")
    rows = np.arange(PEOPLE, dtype=np.int64)
    announce(fed, Alignment(rows, dict.fromkeys(grid.silos, rows), {}), _model_config(run_key))
    share_b = m.get_array(grid.send(silo, m.STEP, plan_b), "plan", np.uint64, 1)
    assert np.abs(decode(share_a - share_b)).max() > 1e6  # independent masks: noise
    assert len(list((grid.root / silo / "checkpoints" / run_key).glob("answers-*.log"))) == 2


def test_a_score_request_id_is_answered_once_even_after_a_restart(grid: AppGrid):
    _, run_key = _aligned(grid)
    silo = "payments"
    ask = m.make_content({"request": "abc123", "explain": 0},
                         positions=np.array([1, 2, 3], dtype=np.int64))
    assert not grid.send(silo, m.SCORE, ask).has_error()
    _refused(grid.send(silo, m.SCORE, ask), "score abc123 was answered already")
    grid.restart(silo)
    grid.send(silo, m.RESUME, m.make_content({"run": run_key, "round": 0}))
    other = m.make_content({"request": "abc123", "explain": 0},
                           positions=np.array([4], dtype=np.int64))
    _refused(grid.send(silo, m.SCORE, other), "answered once")


# ---- 7. ring and bound ------------------------------------------------------------------------


def test_a_silo_clips_what_it_releases(grid: AppGrid, monkeypatch):
    _policy(grid.root, "payments", require_secure_sum=False)
    _policy(grid.root, "social", require_secure_sum=False)
    _policy(grid.root, "device", require_secure_sum=False)
    _aligned(grid, secure=False)
    from clients.silo.trainer import SiloTrainer

    monkeypatch.setattr(SiloTrainer, "released",
                        lambda self, x, *purpose: np.full(len(x), 1e5, dtype=np.float32))
    reply = grid.send("payments", m.STEP, _step(1, plan=np.arange(10, dtype=np.int64)))
    assert np.abs(m.get_array(reply, "plan", np.float32, 1)).max() == masking.MAX_CONTRIBUTION


def test_epoch_selection_is_answered_in_a_non_private_run_only(grid: AppGrid):
    """`keep` / `restore` choose the scored epoch on validation labels: a selection no DP
    accounting covers. A non-private run keeps the weights it is told to, moves on, and
    restores them exactly; a run announced at a finite epsilon refuses both."""
    _policy(grid.root, "payments", require_secure_sum=False)
    assert not grid.send("payments", m.ALIGN, _align("runk")).has_error()
    rows = np.arange(50, dtype=np.int64)
    everyone = np.arange(PEOPLE, dtype=np.int64)
    assert not grid.send("payments", m.STEP, _step(1, plan=rows)).has_error()
    at_keep = m.get_array(grid.send("payments", m.STEP, _step(2, plan=rows, eval_=everyone,
                                                                 done=rows)), "eval")
    keep = _step(3, plan=rows, done=rows)
    keep["config"]["keep"] = True  # kept before this step's gradients move the weights
    assert not grid.send("payments", m.STEP, keep).has_error()
    moved = m.get_array(grid.send("payments", m.STEP, _step(4, eval_=everyone, done=rows)),
                        "eval")
    assert not np.allclose(moved, at_keep)
    with_grad = _step(5, eval_=everyone, done=rows)
    with_grad["config"]["restore"] = True
    assert grid.send("payments", m.STEP, with_grad).has_error()  # restore comes after the last
    restore = _step(5, eval_=everyone)
    restore["config"]["restore"] = True
    np.testing.assert_array_equal(
        m.get_array(grid.send("payments", m.STEP, restore), "eval"), at_keep)

    assert not grid.send("payments", m.ALIGN, _align("rune", epsilon=1.0)).has_error()
    for key in ("keep", "restore"):
        step = _step(1, plan=rows)
        step["config"][key] = True
        _refused(grid.send("payments", m.STEP, step), f"train.step with {key}",
                 "privacy.epsilon=1", "keeps its last epoch")
