"""crypto/he.py: encrypted per-(feature, bin) sums of g and h decrypt to the float64 sums.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from crypto import he

PARAMS = he.HeParams()
BINS = PARAMS.bins


@pytest.fixture(scope="module")
def keys() -> he.SecretHe:
    return he.keygen(params=PARAMS)


def float64_sums(values: np.ndarray, bins: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(b[mask], weights=values[mask], minlength=BINS) for b in bins])


def bound(mask: np.ndarray) -> float:
    """Each value is rounded to a multiple of 2^-frac_bits: at most half of that per row."""
    return int(mask.sum()) * 2.0 ** -(PARAMS.frac_bits + 1) + 1e-9


def check(keys: he.SecretHe, g: np.ndarray, h: np.ndarray, bins: np.ndarray, mask: np.ndarray):
    pairs = he.encrypt_pairs(keys.public, g=g, h=h)
    sums = he.bin_sums(keys.public, pairs=pairs, bins=bins, mask=mask)
    got_g, got_h = he.decrypt_sums(keys, sums=sums)
    assert got_g.shape == got_h.shape == (bins.shape[0], BINS)
    assert np.abs(got_g - float64_sums(g, bins, mask)).max() <= bound(mask)
    assert np.abs(got_h - float64_sums(h, bins, mask)).max() <= bound(mask)


@st.composite
def node(draw: st.DrawFn, max_rows: int = 200) -> tuple[np.ndarray, ...]:
    n = draw(st.integers(1, max_rows))
    features = draw(st.integers(1, 3))
    g = draw(arrays(np.float64, n, elements=st.floats(-1.0, 1.0)))
    h = draw(arrays(np.float64, n, elements=st.floats(0.0, 0.25)))
    bins = draw(arrays(np.int64, (features, n), elements=st.integers(0, BINS - 1)))
    mask = draw(arrays(np.bool_, n))
    return g, h, bins, mask


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=node())
def test_sums_match_float64_including_negative_gradients(keys: he.SecretHe, case) -> None:
    check(keys, *case)


def test_sums_span_ciphertexts_and_silo_ignores_other_nodes(keys: he.SecretHe) -> None:
    # 4,100 rows: two ciphertexts; logloss-like g = p - y (mostly negative for y = 1).
    rng = np.random.default_rng(7)
    n = PARAMS.row_slots + 4
    p = rng.uniform(0.01, 0.99, n)
    g, h = p - (rng.random(n) < p), p * (1 - p)
    bins = rng.integers(0, BINS, (2, n))
    mask = rng.random(n) < 0.5
    mask[-1] = True  # a row in the second ciphertext is in the node
    check(keys, g, h, bins, mask)


def test_one_row_lands_in_its_bin_only(keys: he.SecretHe) -> None:
    g, h = np.array([-0.5, 0.75]), np.array([0.25, 0.1875])
    bins = np.array([[5, 31], [0, 0]])
    sums = he.bin_sums(
        keys.public,
        pairs=he.encrypt_pairs(keys.public, g=g, h=h),
        bins=bins,
        mask=np.array([True, False]),
    )
    got_g, got_h = he.decrypt_sums(keys, sums=sums)
    want_g, want_h = np.zeros((2, BINS)), np.zeros((2, BINS))
    want_g[0, 5] = want_g[1, 0] = -0.5
    want_h[0, 5] = want_h[1, 0] = 0.25
    np.testing.assert_array_equal(got_g, want_g)
    np.testing.assert_array_equal(got_h, want_h)


def test_empty_node_sums_to_zero(keys: he.SecretHe) -> None:
    g = np.array([0.5, -0.25])
    pairs = he.encrypt_pairs(keys.public, g=g, h=np.abs(g))
    sums = he.bin_sums(keys.public, pairs=pairs, bins=np.zeros((1, 2), int), mask=np.zeros(2, bool))
    got_g, got_h = he.decrypt_sums(keys, sums=sums)
    assert not got_g.any()
    assert not got_h.any()


def test_refuses_values_whose_sums_could_wrap(keys: he.SecretHe) -> None:
    big = np.full(4, float(keys.public.plain_modulus) / 2.0 ** (PARAMS.frac_bits + 2))
    with pytest.raises(ValueError, match="wrap"):
        he.encrypt_pairs(keys.public, g=big, h=np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        he.encrypt_pairs(keys.public, g=np.array([np.nan]), h=np.zeros(1))


def test_refuses_bins_out_of_range(keys: he.SecretHe) -> None:
    pairs = he.encrypt_pairs(keys.public, g=np.zeros(3), h=np.zeros(3))
    with pytest.raises(ValueError, match="bins"):
        he.bin_sums(keys.public, pairs=pairs, bins=np.full((1, 3), BINS), mask=np.ones(3, bool))


def test_silo_side_holds_no_secret_key(keys: he.SecretHe) -> None:
    assert not hasattr(keys.public, "secret_key")
    assert "secret_key" not in repr(keys)


@pytest.mark.slow
def test_more_features_than_one_ciphertext_packs(keys: he.SecretHe) -> None:
    # 128 features' bins fit one output ciphertext; the 129th and 130th start a second.
    features = PARAMS.row_slots // BINS + 2
    g, h = np.array([0.5, -0.125, 1.0]), np.array([0.25, 0.0, 0.0625])
    bins = np.arange(features * 3).reshape(features, 3) % BINS
    mask = np.array([True, True, False])
    sums = he.bin_sums(
        keys.public, pairs=he.encrypt_pairs(keys.public, g=g, h=h), bins=bins, mask=mask
    )
    assert len(sums.chunks) == 2
    got_g, got_h = he.decrypt_sums(keys, sums=sums)
    np.testing.assert_array_equal(got_g, float64_sums(g, bins, mask))
    np.testing.assert_array_equal(got_h, float64_sums(h, bins, mask))
