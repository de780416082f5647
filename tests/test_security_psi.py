"""PSI attacks from issue 18, replayed against the old mechanism and the real silo handlers.

1. Twist bit: the old hash took SHA-256 as an X25519 u-coordinate. About half of those lie on
   the quadratic twist, and X25519 keeps a point on its side, so every blinded point leaked one
   bit of H(id). A tiny copy of the old mapping below shows it. Now (crypto/psi.py) every
   hashed point is on the curve (RFC 9380 Elligator 2), every blinded point is in the
   prime-order subgroup (clamped X25519 scalars are multiples of 8), and a twist point sent
   to a party is refused.
2. Membership oracle: psi_finish answered any number of points and psi_blind could be
   repeated, so the authority could probe identifiers of its choosing. Now a silo blinds once
   per run (a marker file survives a restart), finishes once, and at most the set size the
   authority declared in psi_blind.
3. Table order: positions permuted from the public seed let silos undo the permutation. Now
   `joint_order` takes only the authority's secret ChaCha20 stream.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.node import Defaults, Node
from clients.protocol import messages as m
from clients.protocol.schema import federation_silos
from clients.silo import app as ca
from clients.silo.enrolment import enrol
from clients.silo.state import silo_matrix
from crypto.psi import PsiError, PsiKey, hash_to_points, match, on_curve
from crypto.secret_random import SecretRandom
from server.alignment import joint_order
from simulations.data.population import PopulationConfig, generate, write_parties

P = 2**255 - 19
A = 486662


def _old_hash(ids: list[str]) -> list[bytes]:
    """The mapping before issue 18 (crypto/psi.py at d5594de): SHA-256, bit 255 cleared."""
    out = []
    for i in ids:
        d = bytearray(hashlib.sha256(b"fedscore/psi/x25519/v1\x00" + i.encode()).digest())
        d[31] &= 0x7F
        out.append(bytes(d))
    return out


def _on_twist(u_bytes: bytes) -> bool:
    """True when u is the u-coordinate of a point on Curve25519's twist (Euler's criterion on
    u^3 + A u^2 + u): what the receiver of a blinded point can compute."""
    u = int.from_bytes(u_bytes, "little") % P
    return pow((u * u * u + A * u * u + u) % P, (P - 1) // 2, P) == P - 1


def _phones(n: int, start: int = 0) -> list[str]:
    return [f"+86138{i:08d}" for i in range(start, start + n)]


def test_old_hash_leaked_a_bit_per_blinded_point_and_the_new_group_leaks_none():
    ids = _phones(400)
    old = _old_hash(ids)
    twist = np.array([_on_twist(u) for u in old])
    assert 0.4 < twist.mean() < 0.6  # about half of the old hashes lie on the twist
    key = X25519PrivateKey.generate()
    blinded = [key.exchange(X25519PublicKey.from_public_bytes(u)) for u in old]
    # ... and blinding kept every one on its side: the receiver learns that bit of H(id).
    assert np.array_equal([_on_twist(b) for b in blinded], twist)
    # The bit works as a filter: a guess of who a blinded point belongs to is right only
    # among candidates with the same bit, half the dictionary thrown away per point.
    # Now: every hashed point is on the curve and every blinded one too (in the prime-order
    # subgroup), so the bit is the same for everyone and tells nothing.
    points = hash_to_points(ids)
    assert on_curve(points).all()
    assert on_curve(PsiKey().blind(points)).all()
    assert not any(_on_twist(bytes(p)) for p in PsiKey().blind(points))
    # An authority that sends a twist point to be blinded (to learn something from the twist's
    # small subgroups, or to mark a point) is refused.
    twist_u = next(u for u in old if _on_twist(u))
    with pytest.raises(PsiError, match="twist"):
        PsiKey().blind(np.frombuffer(twist_u, np.uint8).reshape(1, 32))


# ---- the silo's handlers, as a deviating authority would drive them --------------------------

_msg_ids = itertools.count(1)


@functools.cache
def _population():
    return generate(PopulationConfig(users=1000, seed=5))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    parties = tmp_path / "parties"
    write_parties(_population(), parties)
    enrol(parties, federation_silos(parties), None)
    return parties


def _context(node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, **(node_config or {})},
                   state=RecordDict(), run_config={})


def _send(app, context: Context, kind: str, run: int = 1, config: dict | None = None,
          **arrays) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run, 1, 0
    msg = Message(m.make_content(config, **arrays), dst_node_id=1, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"{next(_msg_ids):064x}"
    return app(msg, context)


def _refused(reply: Message, words: str) -> None:
    assert reply.has_error(), "the silo answered"
    assert reply.error.code == m.PROTOCOL_ERROR
    assert words in reply.error.reason


def _probe(app, context: Context, guesses: list[str], run: int = 1) -> Message:
    """The oracle attack: finish the silo's blinding on chosen identifiers."""
    key = PsiKey()
    return _send(app, context, m.PSI_FINISH, run, points=key.blind(hash_to_points(guesses)))


def test_repeated_blinding_is_refused_even_after_a_restart(root):
    app = ca.make_client_app(root, None, plaintext=True)
    context = _context()
    first = _send(app, context, m.PSI_BLIND, config={"set_size": 10})
    assert not first.has_error()
    _refused(_send(app, context, m.PSI_BLIND, config={"set_size": 10}), "already answered")
    # A fresh process (state lost) still refuses: the marker lives in the silo's directory.
    _refused(_send(app, _context(), m.PSI_BLIND, config={"set_size": 10}), "already answered")
    # The next run blinds again, with a fresh key.
    assert not _send(app, _context(), m.PSI_BLIND, run=2, config={"set_size": 10}).has_error()


def test_blind_without_a_declared_size_is_refused(root):
    app = ca.make_client_app(root, None, plaintext=True)
    _refused(_send(app, _context(), m.PSI_BLIND), "set_size")
    _refused(_send(app, _context(), m.PSI_BLIND, config={"set_size": 0}), "set_size")


def test_finish_beyond_the_declared_size_or_twice_is_refused(root):
    app = ca.make_client_app(root, None, plaintext=True)
    context = _context()
    assert not _send(app, context, m.PSI_BLIND, config={"set_size": 5}).has_error()
    # Probing a dictionary: more guesses than the declared set are refused outright ...
    _refused(_probe(app, context, _phones(6)), "after declaring 5")
    # ... and the refusal spent the blinding key: no retry with fewer in the same run.
    _refused(_probe(app, context, _phones(5)), "without psi_blind")


def test_second_finish_in_a_run_is_refused(root):
    app = ca.make_client_app(root, None, plaintext=True)
    context = _context()
    assert not _send(app, context, m.PSI_BLIND, config={"set_size": 5}).has_error()
    assert not _probe(app, context, _phones(5)).has_error()
    _refused(_probe(app, context, _phones(5, 5)), "without psi_blind")
    # A blinding state restored into the process (say from a copy) still meets the marker.
    context.state["psi"] = ConfigRecord({"secret": PsiKey().secret, "set_size": 5})
    _refused(_probe(app, context, _phones(5, 5)), "already answered")


def test_silo_cap_on_the_declared_size(root):
    app = ca.make_client_app(root, None, plaintext=True)
    context = _context({"psi-max-authority-size": 100})
    _refused(_send(app, context, m.PSI_BLIND, config={"set_size": 101}), "at most 100")
    assert not _send(app, context, m.PSI_BLIND, config={"set_size": 100}).has_error()


def test_honest_exchange_still_matches(root):
    app = ca.make_client_app(root, None, plaintext=True)
    context = _context()
    silo_ids = silo_matrix(Node(context, Defaults(root, None, True))).ids.to_numpy()
    mine = [*list(silo_ids[:30]), *_phones(20, 90_000_000)]
    blinded = _send(app, context, m.PSI_BLIND, config={"set_size": len(mine)})
    theirs = m.get_array(blinded, "points", np.uint8, 2)
    key = PsiKey()
    doubled = _send(app, context, m.PSI_FINISH, points=key.blind(hash_to_points(mine)))
    i, j = match(m.get_array(doubled, "points", np.uint8, 2), key.blind(theirs))
    assert list(i) == list(range(30))
    assert list(silo_ids[j]) == mine[:30]


# ---- positions ---------------------------------------------------------------------------------

def _pairs(n: int) -> dict:
    rows = np.arange(n)
    return {"payments": (rows, rows), "social": (rows, rows[::-1].copy())}


def test_positions_are_not_predictable_from_the_public_seed():
    n, seed = 500, 0
    # The old order: a permutation from the public run seed, which every silo knows.
    public = np.random.default_rng(seed).permutation(n)
    with pytest.raises(TypeError, match="secret stream"):
        joint_order(_pairs(n), n, np.random.default_rng(seed))
    secret = SecretRandom(bytes(range(32))).generator("positions", "run")
    alignment = joint_order(_pairs(n), n, secret)
    assert sorted(alignment.authority_rows) == list(range(n))
    # Fixed points of the public permutation are at chance level (about 1), not n.
    assert (alignment.authority_rows == public).sum() < 10
    other = SecretRandom(bytes(range(1, 33))).generator("positions", "run")
    assert not np.array_equal(joint_order(_pairs(n), n, other).authority_rows,
                              alignment.authority_rows)


def test_finish_refuses_twist_and_low_order_points(root):
    app = ca.make_client_app(root, None, plaintext=True)
    context = _context()
    assert not _send(app, context, m.PSI_BLIND, config={"set_size": 5}).has_error()
    twist_u = next(u for u in _old_hash(_phones(50)) if _on_twist(u))
    points = np.vstack([PsiKey().blind(hash_to_points(_phones(3))),
                        np.frombuffer(twist_u, np.uint8).reshape(1, 32),
                        np.zeros((1, 32), np.uint8)])
    reply = _send(app, context, m.PSI_FINISH, points=points)
    assert reply.has_error()
    assert "1 of 5 PSI points are not canonical" in reply.error.reason
    assert "1 have low order" in reply.error.reason
    assert twist_u.hex() not in reply.error.reason
