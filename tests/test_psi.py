"""ECDH PSI in ristretto255: the private intersection equals the plaintext one, the hash is the
standard one (known answers), every output is in the prime-order group, malformed input is
refused. The RFC 9380 Curve25519 reference (crypto/h2c_curve25519.py) is checked against the
RFC's own vectors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import h2c_curve25519 as h2c
from crypto import psi
from crypto.psi import (
    L,
    PsiError,
    PsiKey,
    check_points,
    expand_message_xmd,
    hash_to_group,
    hash_to_points,
    match,
    valid_points,
)


def _psi(authority: list[str], silo: list[str]) -> set[tuple[str, str]]:
    """Run the four PSI steps and return the matched (authority id, silo id) pairs."""
    a, b = PsiKey(), PsiKey()
    silo_blinded = b.blind(hash_to_points(silo))
    auth_blinded = a.blind(hash_to_points(authority))
    doubled_own = b.blind(auth_blinded)
    doubled_silo = a.blind(silo_blinded)
    i, j = match(doubled_own, doubled_silo)
    return {(authority[x], silo[y]) for x, y in zip(i, j, strict=True)}


phone = st.integers(13_000_000_000, 19_999_999_999).map(lambda n: f"+86{n}")


@settings(max_examples=40, deadline=None)
@given(
    common=st.sets(phone, max_size=40),
    only_a=st.sets(phone, max_size=40),
    only_b=st.sets(phone, max_size=40),
    seed=st.integers(0, 2**32 - 1),
)
def test_private_intersection_equals_plaintext(common, only_a, only_b, seed):
    only_a, only_b = only_a - common - only_b, only_b - common - only_a
    rng = np.random.default_rng(seed)
    authority = list(rng.permutation(sorted(common | only_a)))
    silo = list(rng.permutation(sorted(common | only_b)))
    pairs = _psi(authority, silo)
    assert all(x == y for x, y in pairs)
    assert {x for x, _ in pairs} == common


def test_blinding_commutes_and_hides_the_hash():
    points = hash_to_points(["+8613800000000", "+8613900000000"])
    a, b = PsiKey(), PsiKey()
    assert np.array_equal(a.blind(b.blind(points)), b.blind(a.blind(points)))
    assert not np.array_equal(a.blind(points), points)
    assert not np.array_equal(a.blind(points), b.blind(points))


def test_pool_gives_the_same_answer_as_one_process():
    points = hash_to_points([f"+86138{i:08d}" for i in range(25_000)])
    key = PsiKey()
    assert np.array_equal(key.blind(points, workers=2), key.blind(points))


def test_chunking_changes_nothing(monkeypatch):
    ids = [f"+86139{i:08d}" for i in range(1000)]
    key = PsiKey()
    whole_points = hash_to_points(ids)
    whole = key.blind(whole_points)
    monkeypatch.setattr(psi, "CHUNK_POINTS", 7)  # 1000 is no multiple of 7: a short last chunk
    assert np.array_equal(hash_to_points(iter(ids)), whole_points)
    assert np.array_equal(key.blind(whole_points), whole)


# ristretto255's hash-to-group test vectors (ristretto.group, RFC 9496's one-way map): the map of
# SHA-512(label).
_R255_LABELS = {
    b"Ristretto is traditionally a short shot of espresso coffee":
        "3066f82a1a747d45120d1740f14358531a8f04bbffe6a819f86dfe50f44a0a46",
    b"made with the normal amount of ground coffee but extracted with":
        "f26e5b6f7d362d2d2a94c5d0e7602cb4773c95a2e5c31a64f133189fa76ed61b",
    b"about half the amount of water in the same amount of time":
        "006ccd2a9e6867e6a2c5cea83d3302cc9de128dd2a9a57dd8ee7b9d7ffe02826",
    b"and is not a Ristretto as some believe.":
        "80bd07262511cdde4863f8a7434cef696750681cb9510eea557088f76d9e5065",
}


def test_ristretto255_one_way_map_known_answers():
    import ctypes
    import hashlib

    lib = psi._sodium()
    for label, expected in _R255_LABELS.items():
        out = ctypes.create_string_buffer(32)
        lib.crypto_core_ristretto255_from_hash(out, hashlib.sha512(label).digest())
        assert out.raw.hex() == expected


# RFC 9380 appendix J.4.1 (curve25519_XMD:SHA-512_ELL2_RO_): P.x for each message.
_J41_DST = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_RO_"
_J41 = {
    b"": "2de3780abb67e861289f5749d16d3e217ffa722192d16bbd9d1bfb9d112b98c0",
    b"abc": "2b4419f1f2d48f5872de692b0aca72cc7b0a60915dd70bde432e826b6abc526d",
    b"abcdef0123456789": "68ca1ea5a6acf4e9956daa101709b1eee6c1bb0df1de3b90d4602382a104c036",
    b"q128_" + b"q" * 128: "096e9c8bae6c06b554c1ee69383bb0e82267e064236b3a30608d4ed20b73ac5a",
}


def test_rfc9380_curve25519_known_answers():
    # u0 of the empty message pins expand_message_xmd and hash_to_field; P.x the whole suite.
    assert h2c._field_pairs([b""], _J41_DST)[0] == int(
        "005fe8a7b8fef0a16c105e6cadf5a6740b3365e18692a9c05bfbb4d97f645a6a", 16)
    got = h2c.hash_to_curve_u(list(_J41), _J41_DST)
    assert [f"{int(u):064x}" for u in got] == list(_J41.values())
    # The PSI's inlined expand_message_xmd equals the general one.
    assert psi.expand_message_xmd(b"abc", _J41_DST, 96) == h2c.expand_message_xmd(
        b"abc", _J41_DST, 96)


def test_hash_to_group_is_the_standard_construction():
    # hash_to_ristretto255(msg) = one-way map of expand_message_xmd(msg, DST, 64).
    import ctypes

    msg = b"+8613800000000"
    out = ctypes.create_string_buffer(32)
    psi._sodium().crypto_core_ristretto255_from_hash(out, expand_message_xmd(msg, psi.DST, 64))
    assert hash_to_group([msg]) == out.raw


def _times(scalar: int, points: np.ndarray) -> list[bytes | None]:
    """scalar * P with libsodium; None where the result is the identity (refused)."""
    import ctypes

    lib, out = psi._sodium(), ctypes.create_string_buffer(32)
    res = []
    for row in points:
        rc = lib.crypto_scalarmult_ristretto255(out, scalar.to_bytes(32, "little"), bytes(row))
        res.append(out.raw if rc == 0 else None)
    return res


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(phone, min_size=1, max_size=8, unique=True))
def test_outputs_are_in_the_prime_order_group(ids):
    points = hash_to_points(ids)
    blinded = PsiKey().blind(points)
    for arr in (points, blinded):
        assert valid_points(arr).all()
        assert _times(L, arr) == [None] * len(arr)  # [L]P = identity
    # [L-1]P = -P, and -(-P) = P: the group has order L, not a multiple of it.
    neg = np.frombuffer(b"".join(_times(L - 1, points)), np.uint8).reshape(-1, 32)
    back = np.frombuffer(b"".join(_times(L - 1, neg)), np.uint8).reshape(-1, 32)
    assert np.array_equal(back, points)


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(phone, min_size=2, max_size=30, unique=True))
def test_distinct_ids_give_distinct_points_and_blinding_commutes(ids):
    points = hash_to_points(ids)
    assert len({bytes(p) for p in points}) == len(ids)
    a, b = PsiKey(), PsiKey()
    assert np.array_equal(a.blind(b.blind(points)), b.blind(a.blind(points)))


def test_invalid_encodings_are_refused_by_blinding():
    good = hash_to_points(["+8613800000000"])
    bad = good.copy()
    bad[0, 0] ^= 1  # most such flips leave the group; find one libsodium refuses
    while valid_points(bad)[0]:
        bad[0, 0] += 2
    non_canonical = np.full((1, 32), 0xFF, np.uint8)  # >= p: never a canonical encoding
    for arr in (bad, non_canonical, np.vstack([good, bad])):
        with pytest.raises(PsiError, match="not ristretto255 group elements"):
            PsiKey().blind(arr)
        with pytest.raises(PsiError, match="not ristretto255 group elements"):
            check_points(arr)


def test_secret_must_be_a_canonical_scalar():
    for secret in (bytes(32), L.to_bytes(32, "little"), b"\x01" * 16):
        with pytest.raises(ValueError, match="scalar"):
            PsiKey(secret)
    key = PsiKey()
    assert np.array_equal(PsiKey(key.secret).blind(hash_to_points(["+8613800000000"])),
                          key.blind(hash_to_points(["+8613800000000"])))


def test_key_repr_does_not_show_the_secret():
    key = PsiKey()
    assert key.secret.hex() not in repr(key)


def test_prefix_collision_is_not_a_match():
    left = np.zeros((1, 32), dtype=np.uint8)
    right = np.zeros((1, 32), dtype=np.uint8)
    right[0, 20] = 1  # same 8-byte prefix, different point
    i, _ = match(left, right)
    assert len(i) == 0


@pytest.mark.parametrize(
    "bad",
    [np.zeros((3, 31), np.uint8), np.zeros((3, 32), np.int64), np.zeros(32, np.uint8)],
)
def test_malformed_points_are_refused(bad):
    with pytest.raises(PsiError, match="32"):
        check_points(bad)


def test_identity_is_refused():
    # The all-zero encoding is the identity: its multiple is the identity, which is refused.
    with pytest.raises(PsiError, match="identity"):
        PsiKey().blind(np.zeros((1, 32), dtype=np.uint8))


def test_duplicate_points_from_a_peer_are_refused():
    pts = hash_to_points(["+8613800000000"])
    with pytest.raises(PsiError, match="duplicate"):
        match(pts, np.vstack([pts, pts]))
