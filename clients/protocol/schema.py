"""What each party's table looks like.

The party side owns this schema, in the protocol both sides share (clients/protocol/): a silo
deploys with it and validates its own table against it, and the generator in `simulations/`
writes tables that follow it. The authority never needs the feature names; it only sees row
positions and contributions.
"""

from __future__ import annotations

import json
import math
import numbers
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.identity import (
    ID_KINDS,
    IdentifierError,
    IdentifierFormat,
    PartyNameError,
    check_party_name,
)

ID_COLUMN = "phone"
LABEL_COLUMN = "default"

# Partition ids of the simulation engine map to silos in this order.
SILOS: tuple[str, ...] = ("payments", "social", "device")
AUTHORITY = "authority"


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # "amount" (skewed, >= 0), "count" (>= 0), "rate" (0..1), "flag" (0/1), "real"
    description: str
    # The column's declared range in its own units, where the kind's default range
    # (clients/silo/data.py KIND_RANGES) is far wider than the feature can be: values outside
    # are clipped before the silo's noisy statistics, so a tighter range means less relative
    # noise. Public knowledge about the feature, never taken from data.
    bounds: tuple[float, float] | None = None


# Bounds are what the feature's definition allows (its time window, a score's scale), generous
# and never read from data: e.g. at most 100 overdue events in 24 months.
SILO_FEATURES: dict[str, tuple[Feature, ...]] = {
    "payments": (
        Feature("on_time_repayment_rate", "rate", "share of instalments repaid on time, 12 m"),
        Feature("overdue_count", "count", "overdue events in 24 months", (0.0, 100.0)),
        Feature("overdue_max_days", "count", "longest overdue spell, days", (0.0, 730.0)),
        Feature("balance", "amount", "average wallet and card balance, CNY"),
        Feature("spend_level", "amount", "average monthly spend, CNY"),
        Feature("spend_stability", "rate", "1 - coefficient of variation of monthly spend"),
        Feature("wealth_holdings", "amount", "wealth-management holdings, CNY"),
        Feature("bill_payments", "count", "utility and phone bills paid in 12 months",
                (0.0, 1000.0)),
        Feature("high_risk_merchant_share", "rate", "share of spend at high-risk merchants"),
        Feature("complaints", "count", "complaints filed against the person in 12 months",
                (0.0, 100.0)),
    ),
    "social": (
        Feature("interaction_freq", "amount", "messages and calls per week", (0.0, 1e5)),
        Feature("red_packet_exchange", "count", "red packets sent and received, 12 months",
                (0.0, 1e4)),
        Feature("group_activity", "rate", "share of joined groups active in 30 days"),
        Feature("contacts_avg_standing", "real", "average score of frequent contacts",
                (300.0, 850.0)),
        Feature("mini_program_use", "count", "mini-program / official-account sessions, 30 d",
                (0.0, 1e4)),
        Feature("donations", "count", "charitable donations, 12 months", (0.0, 1000.0)),
        Feature("violation_reports", "count", "violation reports against the person, 12 m",
                (0.0, 100.0)),
    ),
    "device": (
        Feature("common_device_share", "rate", "share of logins from the usual device"),
        Feature("devices_90d", "count", "distinct devices used in 90 days", (0.0, 100.0)),
        Feature("abnormal_location_logins", "count", "logins from unusual locations, 90 d",
                (0.0, 1000.0)),
        Feature("rebinding_count", "count", "phone or card rebindings in 12 months",
                (0.0, 100.0)),
        Feature("two_factor_on", "flag", "two-factor authentication enabled"),
        Feature("password_age_days", "amount", "days since the last password change",
                (0.0, 36500.0)),
        Feature("location_stability", "rate", "share of days at the two usual locations"),
    ),
}


def feature_names(silo: str) -> list[str]:
    """Feature column names of `silo`, in schema order."""
    try:
        return [f.name for f in SILO_FEATURES[silo]]
    except KeyError:
        raise ValueError(
            f"unknown silo {silo!r}: expected one of {', '.join(SILO_FEATURES)}"
        ) from None


# ---- tables that describe themselves (real data) ---------------------------------------------
# A party folder may hold `schema.json`: its identifier column and kind, and its feature columns
# (a silo) or label column (the authority). Without one, the generated layout above applies. The
# parties directory may hold `parties.json` naming the silos (the simulation maps partition ids
# to them in that order; the authority federates with them).

SCHEMA_FILE = "schema.json"
PARTIES_FILE = "parties.json"
# How a silo prepares a column, fixed by the kind and never by the data (clients/silo/data.py):
# "amount", "count" (log1p of the value, negatives as 0), "rate", "flag" (as they are, 0..1),
# "signed_log", "real", "auto" (sign(x) log1p |x|: amounts that can be negative, or anything
# undeclared); each is then clipped to a declared range and standardised with noisy statistics.
# "category": one column per value (codes such as repayment status are not amounts), the values
# listed in the schema or, without a list, chosen by a noisy thresholded count. A column of text
# is a category column whether declared so or "auto" (clients/silo/data.py `is_text`).
COLUMN_KINDS = ("auto", "signed_log", "category", "amount", "count", "rate", "flag", "real")
# Beyond this many values a numeric "category" column is probably an amount or an id (refused);
# a text category column keeps this many values at most, its most common, the rest "other".
MAX_CATEGORIES = 64


def categories_problem(values: object) -> str | None:
    """What is wrong with a category column's declared values, or None: they must be distinct
    numbers, or distinct texts (compared with surrounding whitespace stripped, case kept)."""
    if not isinstance(values, list | tuple) or not values:
        return 'must be a non-empty list of distinct numbers or texts, e.g. [1, 2] or ["a", "b"]'
    if all(isinstance(v, str) for v in values):
        texts = [v.strip() for v in values]
        if not all(texts) or len(set(texts)) != len(texts):
            return ("must be distinct non-empty texts (surrounding spaces do not count), e.g. "
                    '["a", "b"]')
    elif not all(_finite(v) for v in values) or len(set(values)) != len(values):
        return ("must be a non-empty list of distinct numbers, e.g. [1, 2], or of distinct "
                'texts, e.g. ["a", "b"] (not both)')
    if len(values) > MAX_CATEGORIES:
        fix = ("list none (its most common values are then kept)" if isinstance(values[0], str)
               else "declare it auto")
        return f"are {len(values)} values (more than {MAX_CATEGORIES}); {fix}"
    return None


@dataclass(frozen=True)
class TableSchema:
    id_column: str = ID_COLUMN
    # "phone": normalised to E.164 before PSI; "plain": compared as given, trimmed.
    id_kind: str = "phone"
    features: tuple[str, ...] = ()
    label_column: str = LABEL_COLUMN
    kinds: tuple[tuple[str, str], ...] = ()  # (column, kind); a column not named is "auto"
    # The authority's account-status columns for the opening conditions (server/eligibility.py)
    # that its table holds. None: not declared, the generated layout (all of them); a
    # schema.json (real data) lists the ones it has, none when it says nothing.
    eligibility_columns: tuple[str, ...] | None = None
    # (column, (low, high)): a numeric column's declared range in its own units, tighter than
    # its kind's default; schema.json `"ranges": {"age": [18, 100]}`.
    ranges: tuple[tuple[str, tuple[float, float]], ...] = ()
    # (column, values): a category column's declared values, numbers or texts; schema.json
    # `"categories": {"sex": [1, 2], "region": ["north", "south"]}`. Without a list the values
    # are chosen from the data by a noisy thresholded count, which loses rare values.
    categories: tuple[tuple[str, tuple[float, ...] | tuple[str, ...]], ...] = ()
    # How plain identifiers are normalised (crypto/identity.IdentifierFormat): "AB12" = "ab12",
    # "007" = "7". The same in every party's schema, or PSI finds no one in common.
    id_fold_case: bool = False
    id_strip_leading_zeros: bool = False

    def __post_init__(self) -> None:
        if self.id_kind not in ID_KINDS:
            raise ValueError(f"{SCHEMA_FILE}: id_kind {self.id_kind!r}: choose one of "
                             f"{', '.join(ID_KINDS)}")
        try:
            _ = self.id_format
        except IdentifierError as exc:
            raise ValueError(f"{SCHEMA_FILE}: {exc}") from None
        for column, kind in self.kinds:
            if kind not in COLUMN_KINDS:
                raise ValueError(f"{SCHEMA_FILE}: column {column!r} has kind {kind!r}; choose "
                                 f"one of {', '.join(COLUMN_KINDS)}")
        declared = [c for c, _ in (*self.kinds, *self.ranges, *self.categories)]
        unknown = [c for c in declared if self.features and c not in self.features]
        if unknown:
            raise ValueError(f"{SCHEMA_FILE}: kinds, ranges or categories name "
                             f"{', '.join(repr(c) for c in sorted(set(unknown)))}, not among "
                             "the features; fix the name or add it to features")
        for column, bounds in self.ranges:
            if self.kind(column) == "category":
                raise ValueError(f"{SCHEMA_FILE}: ranges names {column!r}, a category column; "
                                 "declare its values under categories instead")
            if (len(bounds) != 2 or not all(_finite(b) for b in bounds)
                    or not bounds[0] < bounds[1]):
                raise ValueError(f"{SCHEMA_FILE}: the range of {column!r} must be two finite "
                                 f"numbers [low, high] with low < high, not {list(bounds)}")
        for column, values in self.categories:
            if self.kind(column) != "category":
                raise ValueError(f"{SCHEMA_FILE}: categories names {column!r}, whose kind is "
                                 f"{self.kind(column)!r}; declare its kind category")
            problem = categories_problem(values)
            if problem is not None:
                raise ValueError(f"{SCHEMA_FILE}: the categories of {column!r} {problem}")

    @property
    def id_format(self) -> IdentifierFormat:
        """How this table's identifiers are normalised (the same in every party's schema)."""
        return IdentifierFormat(kind=self.id_kind, fold_case=self.id_fold_case,
                                strip_leading_zeros=self.id_strip_leading_zeros)

    def kind(self, column: str) -> str:
        return dict(self.kinds).get(column, "auto")

    def range(self, column: str) -> tuple[float, float] | None:
        """The column's declared range in its own units, None for its kind's default."""
        return dict(self.ranges).get(column)

    def declared_categories(self, column: str) -> tuple[float, ...] | tuple[str, ...] | None:
        """A category column's declared values, None when the schema lists none."""
        return dict(self.categories).get(column)

    def declared_text(self) -> tuple[str, ...]:
        """The columns whose declared categories are texts (a CSV reads them as text)."""
        return tuple(c for c, values in self.categories if values and isinstance(values[0], str))


def _finite(value: object) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _read_schema(directory: Path) -> dict | None:
    path = directory / SCHEMA_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        return raw
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it or remove it") from None


def silo_schema(silo_dir: Path, silo: str) -> TableSchema:
    # The silo's name may come from a node config (`silo="..."`): it must name a directory
    # under the parties root and nothing else.
    check_party_name(silo, "silo")
    raw = _read_schema(silo_dir)
    if raw is None:
        feature_names(silo)  # the error naming the known silos, when `silo` is none of them
        features = SILO_FEATURES[silo]
        return TableSchema(features=tuple(f.name for f in features),
                           kinds=tuple(sorted((f.name, f.kind) for f in features)),
                           ranges=tuple(sorted((f.name, f.bounds) for f in features
                                               if f.bounds is not None)))
    ranges, categories = raw.get("ranges", {}), raw.get("categories", {})
    if not isinstance(ranges, dict) or not isinstance(categories, dict):
        raise ValueError(f"{silo_dir / SCHEMA_FILE}: ranges and categories map column names to "
                         'lists, e.g. "ranges": {"age": [18, 100]}, "categories": {"sex": [1, 2]}')
    return TableSchema(raw.get("id_column", ID_COLUMN), raw.get("id_kind", "phone"),
                       **_id_options(raw), features=tuple(raw.get("features", ())),
                       kinds=tuple(sorted(raw.get("kinds", {}).items())),
                       ranges=tuple(sorted((c, tuple(_as_list(v))) for c, v in ranges.items())),
                       categories=tuple(sorted((c, tuple(_as_list(v)))
                                               for c, v in categories.items())))


def _id_options(raw: dict) -> dict[str, Any]:
    """The identifier normalisation options of a schema.json (absent: off)."""
    return {key: bool(raw.get(key, False))
            for key in ("id_fold_case", "id_strip_leading_zeros")}


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list) else [value]


def authority_schema(authority_dir: Path) -> TableSchema:
    raw = _read_schema(authority_dir)
    if raw is None:
        return TableSchema()
    columns = raw.get("eligibility_columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"{authority_dir / SCHEMA_FILE}: eligibility_columns must be a list of "
                         'column names, e.g. ["real_name_verified"] (or [] for none)')
    return TableSchema(raw.get("id_column", ID_COLUMN), raw.get("id_kind", "phone"),
                       **_id_options(raw), label_column=raw.get("label_column", LABEL_COLUMN),
                       eligibility_columns=tuple(columns))


def federation_silos(parties_root: Path | None) -> tuple[str, ...]:
    """The silos of a parties directory: parties.json, else the generated three."""
    if parties_root is not None and (parties_root / PARTIES_FILE).exists():
        path = parties_root / PARTIES_FILE
        try:
            silos = json.loads(path.read_text())["silos"]
            if not isinstance(silos, list):
                raise TypeError("silos is not a list")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PartyNameError(f"{path} is not valid ({type(exc).__name__}); it holds "
                                 '{"silos": ["payments", ...]}') from None
        for silo in silos:
            try:
                check_party_name(silo, "silo")
            except PartyNameError as exc:
                raise PartyNameError(f"{path}: {exc}") from None
        return tuple(silos)
    return SILOS


def silo_salt(silo: str) -> int:
    """Separates silos' initialisations under one seed; the same in the silo and in the central
    baseline that must start from the same weights."""
    if silo in SILOS:
        return SILOS.index(silo) + 1
    return 1_000 + zlib.crc32(silo.encode()) % 100_000
