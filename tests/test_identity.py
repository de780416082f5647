"""Identifier normalisation and keyed references."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto.identity import IdentifierError, keyed_refs, load_or_create_pepper, normalize_phones

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
