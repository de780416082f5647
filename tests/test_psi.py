"""ECDH PSI on Curve25519: the private intersection equals the plaintext one, the hash is RFC
9380's curve25519_XMD:SHA-512_ELL2_NU_ (its own known answers), every blinded point is the RFC's
cofactor-cleared output times a secret, in the prime-order subgroup, and malformed, twist,
non-canonical and low-order points are refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import psi
from crypto.psi import (
    A,
    L,
    P,
    PsiError,
    PsiKey,
    check_points,
    encode_to_curve_u,
    expand_message_xmd,
    hash_to_points,
    match,
    on_curve,
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


@pytest.mark.slow
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


# RFC 9380 appendix J.4.2 (curve25519_XMD:SHA-512_ELL2_NU_): msg -> (u[0], Q.x, P.x), P = [8]Q.
_J42_DST = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_NU_"
_J42 = {
    b"": ("608d892b641f0328523802a6603427c26e55e6f27e71a91a478148d45b5093cd",
          "51125222da5e763d97f3c10fcc92ea6860b9ccbbd2eb1285728f566721c1e65b",
          "1bb913f0c9daefa0b3375378ffa534bda5526c97391952a7789eb976edfe4d08"),
    b"abc": ("46f5b22494bfeaa7f232cc8d054be68561af50230234d7d1d63d1d9abeca8da5",
             "7d56d1e08cb0ccb92baf069c18c49bb5a0dcd927eff8dcf75ca921ef7f3e6eeb",
             "7c22950b7d900fa866334262fcaea47a441a578df43b894b4625c9b450f9a026"),
    b"abcdef0123456789": (
        "235fe40c443766ce7e18111c33862d66c3b33267efa50d50f9e8e5d252a40aaa",
        "3fbe66b9c9883d79e8407150e7c2a1c8680bee496c62fabe4619a72b3cabe90f",
        "31ad08a8b0deeb2a4d8b0206ca25f567ab4e042746f792f4b7973f3ae2096c52"),
    b"q128_" + b"q" * 128: (
        "001e92a544463bda9bd04ddbe3d6eed248f82de32f522669efc5ddce95f46f5b",
        "227e0bb89de700385d19ec40e857db6e6a3e634b1c32962f370d26f84ff19683",
        "027877759d155b1997d0d84683a313eb78bdb493271d935b622900459d52ceaa"),
    b"a512_" + b"a" * 512: (
        "1a68a1af9f663592291af987203393f707305c7bac9c8d63d6a729bdc553dc19",
        "3bcd651ee54d5f7b6013898aab251ee8ecc0688166fce6e9548d38472f6bd196",
        "5fd892c0958d1a75f54c3182a18d286efab784e774d1e017ba2fb252998b5dc1"),
}


def _times8(u: int) -> int:
    """u([8]Q) from u(Q): three x-only doublings on v^2 = u^3 + A u^2 + u (slow reference)."""
    x, z = u % P, 1
    for _ in range(3):
        xx, zz, xz = x * x % P, z * z % P, x * z % P
        x, z = (xx - zz) ** 2 % P, 4 * xz * (xx + A * xz + zz) % P
    return x * pow(z, -1, P) % P


def test_rfc9380_encode_to_curve_known_answers():
    msgs = list(_J42)
    us = psi.hash_to_field(msgs, _J42_DST)
    assert [f"{int(u):064x}" for u in us] == [v[0] for v in _J42.values()]
    # The map's u-coordinate is the RFC's Q.x; times the cofactor 8 it is the suite's P.x.
    qs = encode_to_curve_u(msgs, _J42_DST)
    assert [f"{int(q):064x}" for q in qs] == [v[1] for v in _J42.values()]
    assert [f"{_times8(int(q)):064x}" for q in qs] == [v[2] for v in _J42.values()]
    # The inlined expand_message_xmd equals the general one, and the hash_to_field reduction.
    for msg, u in zip(msgs, us, strict=True):
        uniform = expand_message_xmd(msg, _J42_DST, 48)
        assert int.from_bytes(uniform, "big") % P == u


def test_blinded_points_are_the_rfc_output_times_a_secret():
    # X25519(k, Q.u) == X25519(k/8, P.u) with P = [8]Q: the blinded point is the RFC's
    # cofactor-cleared output multiplied by the secret. Checked by the reference ladder.
    key = PsiKey()
    k = int.from_bytes(key.secret, "little")
    k = (k & ~7 & ((1 << 255) - 1)) | (1 << 254)  # RFC 7748 clamping
    msg = b"+8613800000000"
    (q,) = encode_to_curve_u([msg])
    blinded = int.from_bytes(bytes(key.blind(hash_to_points(["+8613800000000"]))[0]), "little")
    assert blinded == _ladder(k // 8, _times8(int(q)))


def _ladder(k: int, u: int) -> int:
    """RFC 7748 Montgomery ladder, unclamped scalar, affine u in and out (slow reference)."""
    x1, x2, z2, x3, z3, swap = u, 1, 0, u, 1, 0
    for t in reversed(range(k.bit_length())):
        bit = (k >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % P, (x2 - z2) % P
        aa, bb = a * a % P, b * b % P
        e = (aa - bb) % P
        c, d = (x3 + z3) % P, (x3 - z3) % P
        da, cb = d * a % P, c * b % P
        x3, z3 = (da + cb) ** 2 % P, x1 * (da - cb) ** 2 % P
        x2, z2 = aa * bb % P, e * (aa + 121665 * e) % P
    if swap:
        x2, z2 = x3, z3
    return x2 * pow(z2, P - 2, P) % P  # RFC 7748: the identity (z = 0) gives 0


def _twist_u(start: int) -> int:
    u = start
    while pow((u ** 3 + A * u * u + u) % P, (P - 1) // 2, P) != P - 1:
        u += 1
    return u


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(phone, min_size=1, max_size=8, unique=True))
def test_outputs_are_on_the_curve_and_blinded_ones_in_the_prime_order_subgroup(ids):
    points = hash_to_points(ids)
    blinded = PsiKey().blind(points)
    assert on_curve(points).all()
    assert on_curve(blinded).all()
    for row in blinded:  # [L]R = identity: u([L]R) is 0 for the identity in the ladder
        assert _ladder(L, int.from_bytes(bytes(row), "little")) == 0


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(phone, min_size=2, max_size=30, unique=True))
def test_distinct_ids_give_distinct_points_and_blinding_commutes(ids):
    points = hash_to_points(ids)
    assert len({bytes(p) for p in points}) == len(ids)
    a, b = PsiKey(), PsiKey()
    ab = a.blind(b.blind(points))
    assert np.array_equal(ab, b.blind(a.blind(points)))
    assert len({bytes(p) for p in ab}) == len(ids)


@settings(max_examples=30, deadline=None)
@given(start=st.integers(2, P - 2), where=st.integers(0, 4))
def test_twist_and_non_canonical_points_are_refused(start, where):
    good = hash_to_points(["+8613800000000", "+8613900000000", "+8613700000000"])
    bad = good.copy()
    u = _twist_u(start)
    if u >= P:
        u = _twist_u(2)
    bad[where % 3] = np.frombuffer(u.to_bytes(32, "little"), np.uint8)
    with pytest.raises(PsiError, match="not canonical Curve25519 points"):
        PsiKey().blind(bad)
    with pytest.raises(PsiError, match="not canonical"):
        check_points(bad)


@pytest.mark.parametrize("u", [P, P + 1, P + 9, (1 << 255) + 9, (1 << 256) - 1])
def test_non_canonical_u_is_refused(u):
    # u >= p (and bit 255, which X25519 would silently drop) is never an honest encoding.
    arr = np.frombuffer(u.to_bytes(32, "little"), np.uint8).reshape(1, 32)
    with pytest.raises(PsiError, match="not canonical"):
        PsiKey().blind(arr)


# u-coordinates of every point of order 1, 2, 4, 8 on Curve25519 or its twist with u < p.
_LOW_ORDER = [
    0, 1, P - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
]


@pytest.mark.parametrize("u", _LOW_ORDER)
def test_low_order_points_are_refused(u):
    arr = np.frombuffer(u.to_bytes(32, "little"), np.uint8).reshape(1, 32)
    with pytest.raises(PsiError):
        PsiKey().blind(arr)
    with pytest.raises(PsiError):  # even on this party's own side, an all-zero result
        PsiKey().blind(arr, from_peer=False)


def test_torsion_component_changes_nothing():
    # R + T with T of order 8: the clamped scalar (a multiple of 8) kills T, so the answer is
    # the honest point's. u(R + T) computed with the affine addition law.
    (ru,) = encode_to_curve_u([b"+8613800000000"])
    r = _times8(int(ru))  # a point of the prime-order subgroup
    t = _LOW_ORDER[3]  # order 8
    rv, tv = _y(r), _y(t)
    lam = (tv - rv) * pow(t - r, -1, P) % P
    s = (lam * lam - A - r - t) % P
    assert pow((s ** 3 + A * s * s + s) % P, (P - 1) // 2, P) == 1  # on the curve
    key = PsiKey()
    enc = [np.frombuffer(x.to_bytes(32, "little"), np.uint8) for x in (r, s)]
    out = key.blind(np.vstack(enc))
    assert bytes(out[0]) == bytes(out[1])


def _y(u: int) -> int:
    """A square root of u^3 + A u^2 + u (p = 5 mod 8)."""
    g = (u ** 3 + A * u * u + u) % P
    y = pow(g, (P + 3) // 8, P)
    if y * y % P != g:
        y = y * pow(2, (P - 1) // 4, P) % P
    assert y * y % P == g
    return y


def test_secret_must_be_32_random_bytes():
    for secret in (bytes(32), b"\x01" * 16, b"\x01" * 33):
        with pytest.raises(ValueError, match="32 random bytes"):
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


def test_duplicate_points_from_a_peer_are_refused():
    pts = hash_to_points(["+8613800000000"])
    with pytest.raises(PsiError, match="duplicate"):
        match(pts, np.vstack([pts, pts]))
