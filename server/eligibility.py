"""Opening conditions: who may be scored at all.

Why: the seed documents make a score available only to people who have completed real-name
verification, bound a valid bank card, and had no severe default in the last year. A person who
fails a condition gets status "ineligible" and the reasons (all of them, so one visit tells the
person everything to fix), never a score: a score for someone the product would not open for
would be shown and used although it should not exist.

Input columns (one row per person, any index, e.g. the subject reference):
- `real_name_verified`: 1/True verified, 0/False not; empty (NaN/None/NA) = not on record.
- `card_bound`: 1/True a bank card is bound, 0/False none; empty = not on record.
- `days_since_severe_default`: days since the most recent severe default (0 = today); empty
  (NaN) = never defaulted severely.
An unknown flag counts as not met (the gate fails closed: "not on record" is what the product
would see). A column is needed only when its condition is switched on.

A severe default counts when days_since_severe_default < severe_default_window_days; a window of
0 switches the check off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

REAL_NAME = "real_name_verified"
CARD = "card_bound"
DEFAULT_DAYS = "days_since_severe_default"
ELIGIBLE, INELIGIBLE = "eligible", "ineligible"
MAX_WINDOW_DAYS = 3650
OUTPUT_COLUMNS = ("status", "reason", "reason_zh", "codes")


class EligibilityError(ValueError):
    """A configuration or table the gate cannot use: names the problem and the fix."""


@dataclass(frozen=True)
class EligibilityConfig:
    require_real_name: bool = True
    require_bound_card: bool = True
    severe_default_window_days: int = 365  # 0: no severe-default check

    def __post_init__(self) -> None:
        for name in ("require_real_name", "require_bound_card"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise EligibilityError(f"{name}={value!r}: must be true or false")
        days = self.severe_default_window_days
        if isinstance(days, bool) or not isinstance(days, int | np.integer):
            raise EligibilityError(
                f"severe_default_window_days={days!r}: must be a whole number of days "
                "(365 = one year, 0 = no check)")
        if not 0 <= days <= MAX_WINDOW_DAYS:
            raise EligibilityError(
                f"severe_default_window_days={days}: must be in 0..{MAX_WINDOW_DAYS} "
                "(365 = one year, 0 = no check)")

    def required_columns(self) -> list[str]:
        return [col for col, on in ((REAL_NAME, self.require_real_name),
                                    (CARD, self.require_bound_card),
                                    (DEFAULT_DAYS, self.severe_default_window_days > 0)) if on]


def _reasons(cfg: EligibilityConfig) -> tuple[tuple[str, str, str], ...]:
    """(code, English, Chinese) per condition, in bit order 1, 2, 4."""
    days = cfg.severe_default_window_days
    within_zh = "近1年内" if days == 365 else f"近{days}天内"
    return (
        ("real_name", "real-name verification not completed", "未完成实名认证"),
        ("bound_card", "no bank card bound", "未绑定银行卡"),
        ("severe_default", f"severe default in the last {days} days",
         f"{within_zh}有严重违约记录"),
    )


def _hint(column: str) -> str:
    return {REAL_NAME: "1 = verified, 0 = not, empty = unknown",
            CARD: "1 = a bank card is bound, 0 = none, empty = unknown",
            DEFAULT_DAYS: "days since the last severe default, empty = never"}[column]


def _flag(series: pd.Series) -> np.ndarray:
    """True where the flag is set; unknown counts as not set."""
    column = series.name
    if pd.api.types.is_bool_dtype(series) and series.dtype != object:
        return series.fillna(False).to_numpy(dtype=bool)
    try:
        values = pd.array(series.to_numpy(), dtype="boolean")
        if pd.api.types.is_numeric_dtype(series):
            numeric = series.to_numpy(dtype=np.float64, na_value=np.nan)
            if not np.isin(numeric[~np.isnan(numeric)], (0.0, 1.0)).all():
                raise ValueError
    except (TypeError, ValueError):
        raise EligibilityError(
            f"column {column!r} holds values other than true/false: use {_hint(str(column))}"
        ) from None
    return values.fillna(False).to_numpy(dtype=bool)


def _days(series: pd.Series) -> np.ndarray:
    column = series.name
    kind = pd.api.types.infer_dtype(series, skipna=True)  # "empty" for an all-missing column
    if kind not in ("floating", "integer", "mixed-integer-float", "empty"):
        raise EligibilityError(f"column {column!r} is not a number of days (it holds {kind} "
                               f"values): use {_hint(DEFAULT_DAYS)}")
    days = pd.to_numeric(series).to_numpy(dtype=np.float64, na_value=np.nan)
    negative = int((days < 0).sum())
    if negative:
        raise EligibilityError(f"column {column!r} has {negative} negative value(s) (a default "
                               "in the future?); use days since the default, 0 = today")
    return days


def assess(table: pd.DataFrame, cfg: EligibilityConfig | None = None) -> pd.DataFrame:
    """Status ("eligible" / "ineligible"), reasons in English and Chinese ("" when eligible), and
    machine codes (";"-joined, e.g. "real_name;severe_default") for every row of `table`, same
    index; all four columns are categoricals."""
    cfg = EligibilityConfig() if cfg is None else cfg
    missing = [c for c in cfg.required_columns() if c not in table.columns]
    if missing:
        switches = {REAL_NAME: "require_real_name=False", CARD: "require_bound_card=False",
                    DEFAULT_DAYS: "severe_default_window_days=0"}
        fixes = "; ".join(f"add {c!r} ({_hint(c)}) or set {switches[c]}" for c in missing)
        raise EligibilityError(f"eligibility: the table lacks column(s) {', '.join(missing)}: "
                               f"{fixes}")
    n = len(table)
    code = np.zeros(n, dtype=np.int64)
    if cfg.require_real_name:
        code |= ~_flag(table[REAL_NAME]) * 1
    if cfg.require_bound_card:
        code |= ~_flag(table[CARD]) * 2
    if cfg.severe_default_window_days > 0:
        code |= (_days(table[DEFAULT_DAYS]) < cfg.severe_default_window_days) * 4
    # Every combination of failed conditions has one text (8 in all, distinct): the columns are
    # categoricals over them, so a million people cost a million small integers, no strings.
    reasons = _reasons(cfg)
    combos = [[r for bit, r in enumerate(reasons) if c >> bit & 1] for c in range(8)]

    def column(texts: list[str]) -> pd.Categorical:
        return pd.Categorical.from_codes(code, categories=texts)

    out = pd.DataFrame({
        "status": pd.Categorical.from_codes((code != 0).astype(np.int8),
                                            categories=[ELIGIBLE, INELIGIBLE]),
        "reason": column(["; ".join(r[1] for r in rs) for rs in combos]),
        "reason_zh": column([";".join(r[2] for r in rs) for rs in combos]),
        "codes": column([";".join(r[0] for r in rs) for rs in combos]),
    }, index=table.index)
    log.info("eligibility: %d of %d people ineligible", int((code != 0).sum()), n)
    return out
