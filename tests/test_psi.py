"""ECDH PSI: the private intersection equals the plaintext one; malformed input is refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import psi
from crypto.psi import PsiError, PsiKey, check_points, hash_to_points, match


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


def test_bit_255_is_cleared():
    points = hash_to_points([f"+86138{i:08d}" for i in range(2000)])
    assert (points[:, 31] & 0x80 == 0).all()


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


def test_low_order_point_is_refused():
    with pytest.raises(PsiError, match="low-order"):
        PsiKey().blind(np.zeros((1, 32), dtype=np.uint8))


def test_duplicate_points_from_a_peer_are_refused():
    pts = hash_to_points(["+8613800000000"])
    with pytest.raises(PsiError, match="duplicate"):
        match(pts, np.vstack([pts, pts]))
