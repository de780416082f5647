"""Identifiers: normalisation to E.164 and keyed hashing.

Every party writes phone numbers its own way ("138 1234 5678", "86-138-...", "+8613812345678");
PSI and keyed references only work if all parties hash the same canonical string, so every
identifier goes through `normalize_phones` first.

An unkeyed hash of a phone number protects nothing (about 10^10 candidates, enumerated in
minutes), so at-rest references are HMAC-SHA256 (HMAC-SM3 with the SM4 suite) under a
per-deployment secret pepper.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from crypto.private_files import load_or_create_secret

log = logging.getLogger(__name__)

PEPPER_BYTES = 32


class IdentifierError(ValueError):
    """An identifier column that cannot be normalised."""


class PartyNameError(IdentifierError):
    """A party (silo, region, authority) name that cannot name a directory or a key."""


# A party's name becomes a directory under the parties root, a file name in the credentials and
# part of every encryption context: only a plain identifier may do that (no '/', '..', dots,
# upper case that collides on case-insensitive file systems, or control characters).
_PARTY_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def check_party_name(name: object, what: str = "party") -> str:
    """`name` when it is a valid party name (^[a-z][a-z0-9_]{0,31}$), else PartyNameError."""
    if not isinstance(name, str) or not _PARTY_NAME.fullmatch(name):
        shown = repr(name[:40]) if isinstance(name, str) else type(name).__name__
        raise PartyNameError(
            f"{what} name {shown}: use 1 to 32 lower-case letters, digits or '_', starting "
            "with a letter (e.g. payments or region_2)"
        )
    return name


# Floats hold every integer exactly up to 2^53; a phone number (at most 17 digits) beyond that
# may already have been rounded when the column was written.
_EXACT_FLOAT = 2.0**53
# A number written out from a float column ("13812345678.0", as Python and pandas write one):
# digits, then ".0". Without this the '.' would count as a separator and the 0 as a digit. A
# float never carries a '+' nor more zeros, so "+86 1300.0000000" is a dot-separated number.
FLOAT_TEXT = re.compile(r"^\s*([0-9]{6,17})\.0\s*$")


def _exact_text(raw: pd.Series) -> pd.Series:
    """Identifiers as text: a numeric column is converted digit for digit when every value is
    a whole number a float holds exactly, else refused naming the column (never a value)."""
    column = f"column {raw.name!r}" if raw.name is not None else "the identifier column"
    fix = ("write the column as text (e.g. pd.read_csv(..., dtype={col: str}) or "
           "df[col].astype(str) before saving), so no digit is lost")
    if pd.api.types.is_bool_dtype(raw.dtype):
        raise IdentifierError(f"{column} holds true/false values, not identifiers; {fix}")
    if pd.api.types.is_integer_dtype(raw.dtype):
        return raw.astype("string")
    if pd.api.types.is_float_dtype(raw.dtype):
        return _floats_to_text(raw, column, fix)
    if raw.dtype == object:
        floats = raw.map(lambda v: isinstance(v, float | np.floating)).to_numpy(dtype=bool)
        if floats.any():
            out = raw.astype(object).copy()
            out[floats] = _floats_to_text(raw[floats].astype(np.float64), column, fix)
            return out
    return raw


def _floats_to_text(raw: pd.Series, column: str, fix: str) -> pd.Series:
    values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
    known = ~np.isnan(values)
    bad = known & ~(np.isfinite(values) & (np.abs(values) < _EXACT_FLOAT)
                    & (values == np.round(values)) & (values >= 0))
    if bad.any():
        raise IdentifierError(
            f"{column} was read as floating-point numbers and {int(bad.sum())} of them are not "
            f"whole numbers below 2^53, so digits may already be lost; {fix}"
        )
    log.warning("%s was read as floating-point numbers; converted exactly (every value is a "
                "whole number below 2^53); store it as text to avoid this", column)
    text = np.full(len(values), None, dtype=object)
    text[known] = [str(int(v)) for v in values[known]]
    return pd.Series(text, index=raw.index, dtype="string")


# Python's `\s` (str.isspace): RE2, which runs Arrow's regexes, knows only ASCII whitespace.
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
              "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_SEPARATORS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in WHITESPACE) + r"\-\.\(\)/]"


def normalize_phones(raw: pd.Series, default_country: str = "86") -> pd.Series:
    """Normalise phone numbers to E.164 ("+<country><national>"), vectorised in Arrow.

    Accepts spaces, dashes, dots, brackets, a leading "+", "00" or the country code itself;
    full-width digits, plus signs and brackets count as their ASCII twins (NFKC).
    A national number (no country code) gets `default_country`. Raises IdentifierError naming
    how many entries are unusable, never which ones (they are identifiers).
    """
    if not default_country.isdigit():
        raise IdentifierError(f"default_country must be digits, got {default_country!r}")
    raw = _exact_text(raw)
    try:
        text = pa.array(raw.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        text = pa.array(raw.astype("string").to_numpy(dtype=object), type=pa.string(),
                        from_pandas=True)
    if text.null_count:
        raise IdentifierError(
            f"{text.null_count} identifiers are empty; every row needs a phone number "
            "(drop those rows before loading)"
        )
    text = pc.utf8_normalize(text, "NFKC")
    # "13812345678.0": a float column written as text. The point is not a separator here.
    text = pc.replace_substring_regex(text, FLOAT_TEXT.pattern, r"\1")
    plus = pc.starts_with(pc.utf8_trim_whitespace(text), "+")
    digits = pc.utf8_ltrim(pc.replace_substring_regex(text, _SEPARATORS, ""), "+")
    bad = int(pc.sum(pc.invert(pc.match_substring_regex(digits, r"^[0-9]{6,17}$"))).as_py() or 0)
    if bad:
        raise IdentifierError(
            f"{bad} identifiers are not phone numbers (only digits, spaces, '+', "
            "'-', '.', '(', ')' are allowed, 6 to 17 digits); fix or drop those rows"
        )
    intl_00 = pc.and_(pc.invert(plus), pc.starts_with(digits, "00"))
    digits = pc.if_else(intl_00, pc.utf8_slice_codeunits(digits, 2), digits)
    cc = default_country
    # China mobile numbers are 11 digits starting with 1; a leading country code makes 13.
    has_cc = pc.or_(pc.or_(plus, intl_00), pc.and_(
        pc.starts_with(digits, cc), pc.equal(pc.utf8_length(digits), len(cc) + 11)))
    national = pc.utf8_ltrim(digits, "0")
    out = pc.if_else(has_cc, pc.binary_join_element_wise("+", digits, ""),
                     pc.binary_join_element_wise("+" + cc, national, ""))
    return pd.Series(out.to_numpy(zero_copy_only=False), index=raw.index, dtype="string")


ID_KINDS = ("phone", "plain")


@dataclass(frozen=True, kw_only=True)
class IdentifierFormat:
    """How a party's identifier column becomes the canonical string every party compares.

    `phone`: E.164 (`normalize_phones`). `plain` (customer numbers and the like): trimmed text,
    optionally with case folded ("ab12" = "AB12") and leading zeros dropped ("00123" = "123",
    "0" stays "0"). Trailing zeros are significant ("1200" is not "12"), so they always stay.
    Every party of a federation must use the same format, or PSI finds no one in common."""

    kind: str = "phone"
    fold_case: bool = False
    strip_leading_zeros: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ID_KINDS:
            raise IdentifierError(f"unknown identifier kind {self.kind!r}: use "
                                  f"{' or '.join(ID_KINDS)}")
        if self.kind == "phone" and (self.fold_case or self.strip_leading_zeros):
            raise IdentifierError("fold_case and strip_leading_zeros apply to plain "
                                  "identifiers; phone numbers have their own normalisation "
                                  "(E.164)")

    def describe(self) -> str:
        """What the identifiers are and how they are compared, for error messages."""
        if self.kind == "phone":
            return "phone numbers (compared after E.164 normalisation)"
        how = ["surrounding whitespace removed"]
        if self.fold_case:
            how.append("case folded")
        if self.strip_leading_zeros:
            how.append("leading zeros dropped")
        return f"plain identifiers (compared as exact text, {', '.join(how)})"


PHONE = IdentifierFormat()


def normalize_ids(raw: pd.Series, kind: str | IdentifierFormat = "phone") -> pd.Series:
    """Canonical identifier strings in `kind`'s format (a kind name: its default options)."""
    fmt = kind if isinstance(kind, IdentifierFormat) else IdentifierFormat(kind=kind)
    if fmt.kind == "phone":
        return normalize_phones(raw)
    text = _exact_text(raw).astype("string").str.strip()
    empty = text.isna() | (text == "")
    if empty.any():
        raise IdentifierError(f"{int(empty.sum())} identifiers are empty; every row needs one "
                              "(drop those rows before loading)")
    if fmt.fold_case:
        text = text.str.casefold()
    if fmt.strip_leading_zeros:
        # "000" is the identifier 0, not an empty one; "0 7" becomes "7", not " 7".
        text = text.str.replace(r"^[0\s]+(?=\S)", "", regex=True)
    return text


def unique_ids(raw: pd.Series, fmt: IdentifierFormat) -> pd.Series:
    """`normalize_ids`, refusing a column where one person appears twice after normalisation:
    the one check every party (silo, authority, `fedscore data check`) applies to its table.
    The error counts the duplicates and never names one."""
    ids = normalize_ids(raw, fmt)
    dup = int(ids.duplicated().sum())
    if dup:
        raise IdentifierError(f"{dup} identifiers appear more than once (after "
                              "normalisation); keep one row per person")
    return ids


def new_pepper() -> bytes:
    return secrets.token_bytes(PEPPER_BYTES)


def load_or_create_pepper(path: Path) -> bytes:
    """The deployment's pepper at `path`, made (mode 0600) on first use. A lost pepper cannot
    be made again: a new one changes every subject reference."""
    return load_or_create_secret(path, PEPPER_BYTES, "pepper file")


REF_HASHES = ("sha256", "sm3")


def keyed_refs(e164: pd.Series | np.ndarray, pepper: bytes, hash_name: str = "sha256"
               ) -> np.ndarray:
    """HMAC(pepper, id) as 32-hex-character references (128 bits, enough to be unique), with
    SHA-256 or, for the national-standard suite, SM3 (from `cryptography`).

    Per-item HMAC is the floor here (~570k/s); no vectorised HMAC exists in the stdlib.
    """
    if len(pepper) < 16:
        raise ValueError("pepper must be at least 16 bytes")
    if hash_name == "sha256":
        base = hmac.new(pepper, digestmod=hashlib.sha256)

        def ref(value: str) -> str:
            h = base.copy()
            h.update(value.encode())
            return h.hexdigest()[:32]
    elif hash_name == "sm3":
        sm3 = crypto_hmac.HMAC(pepper, hashes.SM3())

        def ref(value: str) -> str:
            h = sm3.copy()
            h.update(value.encode())
            return h.finalize()[:16].hex()
    else:
        raise ValueError(f"unknown reference hash {hash_name!r}: choose one of "
                         f"{', '.join(REF_HASHES)}")

    return np.array([ref(v) for v in np.asarray(e164, dtype=object)], dtype=object)
