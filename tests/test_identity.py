"""Identifier normalisation and keyed references."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives import hashes
from hypothesis import assume, given
from hypothesis import strategies as st

from crypto.identity import (
    FLOAT_TEXT,
    WHITESPACE,
    IdentifierError,
    keyed_refs,
    load_or_create_pepper,
    normalize_phones,
)

FORMATS = (
    lambda n: f"+86{n}",
    lambda n: f"{n[:3]} {n[3:7]} {n[7:]}",
    lambda n: f"86-{n[:3]}-{n[3:7]}-{n[7:]}",
    lambda n: f"(+86) {n}",
    lambda n: f"0086 {n}",
    lambda n: n,
)

mobile = st.integers(13_000_000_000, 19_999_999_999).map(str)


@given(number=mobile, fmt=st.sampled_from(FORMATS))
def test_every_format_normalises_to_e164(number, fmt):
    out = normalize_phones(pd.Series([fmt(number)]))
    assert out.iloc[0] == f"+86{number}"


@given(numbers=st.lists(mobile, min_size=1, max_size=30, unique=True))
def test_normalisation_is_idempotent_and_injective(numbers):
    once = normalize_phones(pd.Series(numbers))
    assert once.equals(normalize_phones(once))
    assert once.is_unique


def test_whitespace_is_every_character_python_calls_whitespace():
    # The Arrow (RE2) regex spells out the class; Python's own is the reference.
    assert set(WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}


@given(number=mobile, fmt=st.sampled_from(FORMATS),
       noise=st.lists(st.tuples(st.integers(0, 20), st.sampled_from(WHITESPACE + "-./()")),
                      max_size=6))
def test_any_separator_anywhere_is_ignored(number, fmt, noise):
    text = fmt(number)
    for at, sep in noise:
        text = text[:at] + sep + text[at:]
    # "1300000000.0" is how a float column writes a number: read so, not as a separator.
    assume(not FLOAT_TEXT.match(text))
    assert normalize_phones(pd.Series([text])).iloc[0] == f"+86{number}"


def test_a_dot_before_zeros_after_a_plus_is_a_separator():
    """Found by the property above: a float is written with one zero and no '+'."""
    assert normalize_phones(pd.Series(["+861300.0000000"])).iloc[0] == "+8613000000000"
    assert normalize_phones(pd.Series(["13000000000.0"])).iloc[0] == "+8613000000000"


def test_full_width_digits_count_as_ascii():
    full = ("\uff0b\uff18\uff16 \uff11\uff13\uff18\u3000"
            "\uff11\uff12\uff13\uff14 \uff15\uff16\uff17\uff18")
    assert list(normalize_phones(pd.Series([full]))) == ["+8613812345678"]
    with pytest.raises(IdentifierError, match="1 identifiers are not phone numbers"):
        normalize_phones(pd.Series(["+8613812345678", "\u0661\u0663\u0668\u0661\u0662\u0663"]))


def test_foreign_numbers_keep_their_country_code():
    out = normalize_phones(pd.Series(["+44 20 7946 0958", "+1 (415) 555-0100"]))
    assert list(out) == ["+442079460958", "+14155550100"]


@pytest.mark.parametrize("bad", ["call me", "12", "+86 138 0000 0000 ext 5", None])
def test_unusable_identifiers_are_refused_without_echoing_them(bad):
    with pytest.raises(IdentifierError) as err:
        normalize_phones(pd.Series(["+8613800000000", bad]))
    assert "1 identifiers" in str(err.value)
    if bad:
        assert bad not in str(err.value)


def test_keyed_refs_depend_on_the_pepper_and_are_not_plain_hashes():
    ids = pd.Series(["+8613800000000", "+8613900000000"])
    p1, p2 = os.urandom(32), os.urandom(32)
    r1, r2 = keyed_refs(ids, p1), keyed_refs(ids, p2)
    assert list(r1) == list(keyed_refs(ids, p1))
    assert set(r1).isdisjoint(r2)
    plain = hashlib.sha256(ids[0].encode()).hexdigest()
    assert plain[:32] != r1[0]
    assert plain != r1[0]


def _sm3(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()


def test_sm3_known_answer():
    # GB/T 32905-2016, example 1.
    assert _sm3(b"abc").hex() == (
        "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0")


@given(pepper=st.binary(min_size=16, max_size=80),
       ids=st.lists(st.from_regex(r"\+86 1[3-9][0-9]{9}", fullmatch=True).map(
           lambda v: v.replace(" ", "")), min_size=1, max_size=5))
def test_hmac_sm3_refs_follow_rfc_2104(pepper, ids):
    """HMAC-SM3 built by hand from SM3 (block size 64) must give the same references."""
    key = (_sm3(pepper) if len(pepper) > 64 else pepper).ljust(64, b"\0")
    inner = bytes(b ^ 0x36 for b in key)
    outer = bytes(b ^ 0x5C for b in key)
    expected = [_sm3(outer + _sm3(inner + v.encode()))[:16].hex() for v in ids]
    assert list(keyed_refs(np.array(ids, dtype=object), pepper, "sm3")) == expected


def test_sm3_and_sha256_refs_differ_and_unknown_hash_is_refused():
    ids = pd.Series(["+8613800000000"])
    pepper = os.urandom(32)
    assert keyed_refs(ids, pepper, "sm3")[0] != keyed_refs(ids, pepper, "sha256")[0]
    with pytest.raises(ValueError, match="sha256, sm3"):
        keyed_refs(ids, pepper, "md5")


def test_pepper_file_is_private_and_stable(tmp_path):
    path = tmp_path / "authority" / "pepper.key"
    pepper = load_or_create_pepper(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_or_create_pepper(path) == pepper


def test_world_readable_pepper_is_refused(tmp_path):
    path = tmp_path / "pepper.key"
    load_or_create_pepper(path)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_pepper(path)
