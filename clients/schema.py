"""What each party's table looks like.

The silo side owns this schema: a silo deploys with it and validates its own table against it,
and the generator in `simulations/` writes tables that follow it. The authority never needs
the feature names; it only sees row positions and contributions.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

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


SILO_FEATURES: dict[str, tuple[Feature, ...]] = {
    "payments": (
        Feature("on_time_repayment_rate", "rate", "share of instalments repaid on time, 12 m"),
        Feature("overdue_count", "count", "overdue events in 24 months"),
        Feature("overdue_max_days", "count", "longest overdue spell, days"),
        Feature("balance", "amount", "average wallet and card balance, CNY"),
        Feature("spend_level", "amount", "average monthly spend, CNY"),
        Feature("spend_stability", "rate", "1 - coefficient of variation of monthly spend"),
        Feature("wealth_holdings", "amount", "wealth-management holdings, CNY"),
        Feature("bill_payments", "count", "utility and phone bills paid in 12 months"),
        Feature("high_risk_merchant_share", "rate", "share of spend at high-risk merchants"),
        Feature("complaints", "count", "complaints filed against the person in 12 months"),
    ),
    "social": (
        Feature("interaction_freq", "amount", "messages and calls per week"),
        Feature("red_packet_exchange", "count", "red packets sent and received, 12 months"),
        Feature("group_activity", "rate", "share of joined groups active in 30 days"),
        Feature("contacts_avg_standing", "real", "average score of frequent contacts"),
        Feature("mini_program_use", "count", "mini-program / official-account sessions, 30 d"),
        Feature("donations", "count", "charitable donations, 12 months"),
        Feature("violation_reports", "count", "violation reports against the person, 12 m"),
    ),
    "device": (
        Feature("common_device_share", "rate", "share of logins from the usual device"),
        Feature("devices_90d", "count", "distinct devices used in 90 days"),
        Feature("abnormal_location_logins", "count", "logins from unusual locations, 90 d"),
        Feature("rebinding_count", "count", "phone or card rebindings in 12 months"),
        Feature("two_factor_on", "flag", "two-factor authentication enabled"),
        Feature("password_age_days", "amount", "days since the last password change"),
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
ID_KINDS = ("phone", "plain")
# How a silo prepares a column: "auto" (log1p when skewed and >= 0, then standardised),
# "signed_log" (sign(x) log1p |x|, for amounts that can be negative, then standardised),
# "category" (one column per observed value: codes such as repayment status are not amounts).
COLUMN_KINDS = ("auto", "signed_log", "category")


@dataclass(frozen=True)
class TableSchema:
    id_column: str = ID_COLUMN
    # "phone": normalised to E.164 before PSI; "plain": compared as given, trimmed.
    id_kind: str = "phone"
    features: tuple[str, ...] = ()
    label_column: str = LABEL_COLUMN
    kinds: tuple[tuple[str, str], ...] = ()  # (column, kind) where not "auto"
    # The authority's account-status columns for the opening conditions (server/eligibility.py)
    # that its table holds. None: not declared, the generated layout (all of them); a
    # schema.json (real data) lists the ones it has, none when it says nothing.
    eligibility_columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.id_kind not in ID_KINDS:
            raise ValueError(f"{SCHEMA_FILE}: id_kind {self.id_kind!r}: choose one of "
                             f"{', '.join(ID_KINDS)}")
        for column, kind in self.kinds:
            if kind not in COLUMN_KINDS:
                raise ValueError(f"{SCHEMA_FILE}: column {column!r} has kind {kind!r}; choose "
                                 f"one of {', '.join(COLUMN_KINDS)}")

    def kind(self, column: str) -> str:
        return dict(self.kinds).get(column, "auto")


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
    raw = _read_schema(silo_dir)
    if raw is None:
        return TableSchema(features=tuple(feature_names(silo)))
    return TableSchema(raw.get("id_column", ID_COLUMN), raw.get("id_kind", "phone"),
                       tuple(raw.get("features", ())),
                       kinds=tuple(sorted(raw.get("kinds", {}).items())))


def authority_schema(authority_dir: Path) -> TableSchema:
    raw = _read_schema(authority_dir)
    if raw is None:
        return TableSchema()
    columns = raw.get("eligibility_columns", [])
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"{authority_dir / SCHEMA_FILE}: eligibility_columns must be a list of "
                         'column names, e.g. ["real_name_verified"] (or [] for none)')
    return TableSchema(raw.get("id_column", ID_COLUMN), raw.get("id_kind", "phone"),
                       label_column=raw.get("label_column", LABEL_COLUMN),
                       eligibility_columns=tuple(columns))


def federation_silos(parties_root: Path | None) -> tuple[str, ...]:
    """The silos of a parties directory: parties.json, else the generated three."""
    if parties_root is not None and (parties_root / PARTIES_FILE).exists():
        return tuple(json.loads((parties_root / PARTIES_FILE).read_text())["silos"])
    return SILOS


def silo_salt(silo: str) -> int:
    """Separates silos' initialisations under one seed; the same in the silo and in the central
    baseline that must start from the same weights."""
    if silo in SILOS:
        return SILOS.index(silo) + 1
    return 1_000 + zlib.crc32(silo.encode()) % 100_000
