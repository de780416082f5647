"""Secure sum: encoding round trips, masks cancel, a lone share reveals nothing useful."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from crypto.masking import (
    FRACTION_BITS,
    MAX_CONTRIBUTION,
    MaskingError,
    PairwiseKeys,
    check_ring,
    clip_contribution,
    decode,
    encode,
    mask_context,
    masked_share,
    max_silos,
    pair_mask,
    ring_sum,
)

finite = st.floats(-MAX_CONTRIBUTION, MAX_CONTRIBUTION, allow_nan=False, allow_infinity=False)


@given(arrays(np.float64, st.integers(0, 50), elements=finite))
def test_fixed_point_round_trip(values):
    assert np.allclose(decode(encode(values)), values, atol=2.0 ** -FRACTION_BITS)


@given(arrays(np.float64, st.integers(1, 30), elements=finite),
       arrays(np.float64, st.integers(1, 30), elements=finite))
def test_ring_sum_of_encodings_is_the_encoding_of_the_sum(a, b):
    n = min(len(a), len(b))
    total = decode(ring_sum([encode(a[:n]), encode(b[:n])]))
    assert np.allclose(total, a[:n] + b[:n], atol=2 * 2.0 ** -FRACTION_BITS)


def _shared(names: list[str]) -> dict[str, dict[str, bytes]]:
    keys = {n: PairwiseKeys() for n in names}
    return {n: {p: keys[n].shared_with(keys[p].public) for p in names if p != n} for n in names}


@settings(max_examples=25, deadline=None)
@given(st.lists(arrays(np.float64, 40, elements=st.floats(-50, 50)), min_size=2, max_size=4),
       st.integers(0, 2**40))
def test_masks_cancel_in_the_sum(parts, round_):
    names = [f"silo{i}" for i in range(len(parts))]
    shared = _shared(names)
    ctx = mask_context("run1", round_, "plan", b"msg")
    shares = [masked_share(v, n, shared[n], ctx) for n, v in zip(names, parts, strict=True)]
    assert np.allclose(decode(ring_sum(shares)), np.sum(parts, axis=0), atol=1e-5)


def test_a_lone_share_looks_uniform_and_masks_are_fresh():
    shared = _shared(["a", "b", "c"])
    values = np.zeros(20_000)
    share = masked_share(values, "a", shared["a"], mask_context("r", 1, "plan", b"msg"))
    # Far from the encoding of zeros: top byte spread over all 256 values.
    assert len(np.unique(share >> np.uint64(56))) == 256
    again = masked_share(values, "a", shared["a"], mask_context("r", 2, "plan", b"msg"))
    assert not np.array_equal(share, again)
    other = masked_share(values, "a", shared["a"], mask_context("r", 1, "eval", b"msg"))
    assert not np.array_equal(share, other)


def test_pairwise_secrets_agree_and_the_relay_cannot_derive_them():
    a, b, relay = PairwiseKeys(), PairwiseKeys(), PairwiseKeys()
    assert a.shared_with(b.public) == b.shared_with(a.public)
    assert relay.shared_with(a.public) != a.shared_with(b.public)
    assert a.secret.hex() not in repr(a)


def test_a_share_from_a_stale_round_breaks_the_sum_visibly():
    shared = _shared(["a", "b"])
    v = np.ones(10)
    fresh = masked_share(v, "a", shared["a"], mask_context("r", 5, "plan", b"msg"))
    stale = masked_share(v, "b", shared["b"], mask_context("r", 4, "plan", b"msg"))
    assert np.abs(decode(ring_sum([fresh, stale]))).max() > 1e3


@pytest.mark.parametrize("bad", [np.array([np.nan]), np.array([np.inf]), np.array([1e12]),
                                 np.array([MAX_CONTRIBUTION + 1])])
def test_unencodable_values_are_refused(bad):
    with pytest.raises(MaskingError):
        encode(bad)


def test_malformed_share_is_refused():
    with pytest.raises(MaskingError, match="out of step"):
        ring_sum([np.zeros(3, np.uint64), np.zeros(4, np.uint64)])
    with pytest.raises(MaskingError, match="out of step"):
        ring_sum([np.zeros(3, np.uint64), np.zeros(3, np.float32)])


def test_mask_is_deterministic_per_context():
    secret = b"k" * 32
    assert np.array_equal(pair_mask(secret, b"x", 5), pair_mask(secret, b"x", 5))


def test_the_authority_refuses_a_sum_with_stale_masks():
    from server.federation import FederationError
    from server.training import _summed

    class Reply:  # the two calls _summed makes on a Flower message
        def __init__(self, share: np.ndarray) -> None:
            from clients.protocol.messages import make_content

            self.content = make_content(plan=share)
            self.metadata = type("M", (), {"message_type": "train.step"})()

    shared = _shared(["a", "b"])
    v = np.ones(10)
    fresh = masked_share(v, "a", shared["a"], mask_context("r", 5, "plan", b"msg"))
    good = masked_share(v, "b", shared["b"], mask_context("r", 5, "plan", b"msg"))
    stale = masked_share(v, "b", shared["b"], mask_context("r", 4, "plan", b"msg"))
    assert np.allclose(_summed({"a": Reply(fresh), "b": Reply(good)}, "plan", 10, True), 2.0)
    with pytest.raises(FederationError, match="did not decode"):
        _summed({"a": Reply(fresh), "b": Reply(stale)}, "plan", 10, True)
    with pytest.raises(FederationError, match="did not send masked uint64 shares"):
        _summed({"a": Reply(fresh), "b": Reply(v.astype(np.float32))}, "plan", 10, True)


def test_masks_are_bound_to_the_message_they_answer():
    shared = _shared(["a", "b"])
    v = np.zeros(1000)
    one = masked_share(v, "a", shared["a"], mask_context("r", 4, "plan", b"plan A"))
    other = masked_share(v, "a", shared["a"], mask_context("r", 4, "plan", b"plan B"))
    # Same run, round and purpose, different messages: unrelated masks, so two answers for
    # round 4 no longer subtract to a difference of exact contributions.
    assert not np.array_equal(one, other)
    assert len(np.unique((one - other) >> np.uint64(56))) > 200
    # Length prefixes: moving bytes between fields changes the context.
    assert mask_context("r1", 4, "plan", b"x") != mask_context("r", 4, "1plan", b"x")


def test_the_ring_is_sized_for_the_federation():
    # Old ring: |value| < 2^36 at 24 fraction bits, so 8 silos at the bound wrapped 2^63.
    old_bound = float(1 << 36)
    assert 8 * old_bound * 2.0 ** FRACTION_BITS >= 2.0 ** 63
    # Clipped to the declared bound, the ring holds far more silos than any federation has.
    assert max_silos() >= 1_000_000
    check_ring(max_silos())
    with pytest.raises(MaskingError, match="overflows"):
        check_ring(max_silos() + 1)
    # At the largest federation, every silo at +bound still decodes exactly.
    n = 1000
    total = decode(ring_sum([encode(np.full(3, MAX_CONTRIBUTION))] * n))
    assert np.allclose(total, n * MAX_CONTRIBUTION)
    assert np.array_equal(clip_contribution(np.array([-1e9, 3.0, 1e9])),
                          [-MAX_CONTRIBUTION, 3.0, MAX_CONTRIBUTION])


def test_the_authority_names_a_silo_beyond_the_bound_in_plaintext():
    from server.federation import FederationError
    from server.training import _summed

    class Reply:
        def __init__(self, part: np.ndarray) -> None:
            from clients.protocol.messages import make_content

            self.content = make_content(plan=part)
            self.metadata = type("M", (), {"message_type": "train.step"})()

    honest = np.ones(4, np.float32)
    shifted = np.array([0, 0, 0, 1e4], np.float32)  # moves one person's logit by 10^4
    assert np.allclose(_summed({"a": Reply(honest), "b": Reply(honest)}, "plan", 4, False), 2)
    with pytest.raises(FederationError, match="silo 'b' sent contributions beyond"):
        _summed({"a": Reply(honest), "b": Reply(shifted)}, "plan", 4, False)
