"""A silo's text category columns: which columns hold words, their cells, and their one-hot
encoding over the values kept by the statistics release (clients/silo/data.py).

A feature column holding text is a category column, declared ("category") or detected (an
"auto" column whose non-empty cells are at least half text: a column of numbers with a few
stray words is a mistake to fix, not categories). Cells are compared with surrounding
whitespace stripped and case kept ("North" and "north" are two values); an empty or blank cell
is missing. No cell value is ever echoed in a message: it might be an identifier.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from clients.protocol.schema import MAX_CATEGORIES, TableSchema
from clients.protocol.tables import SiloDataError

log = logging.getLogger(__name__)


def stored_as_numbers(values: pd.Series) -> bool:
    """Whether a column is stored as numbers (true/false is not)."""
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


# The texts pandas reads as missing in a CSV by default: a parquet table written from a frame
# with `astype(str)` holds them as words, and they must mean the same in both formats.
NA_TEXTS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                      "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                      "nan", "null"})


def text_cells(values: pd.Series) -> pd.Series:
    """A text column's cells as stripped strings; empty, blank or NA-word cells missing (<NA>).
    Whole numbers stored as floats read as integers ("1", not "1.0"): a column of codes that
    arrives as floats at scoring time must meet the values it was fitted on."""
    if pd.api.types.is_float_dtype(values):
        number = values.to_numpy(dtype=np.float64)
        whole = np.isfinite(number) & (np.abs(number) < 2.0**53) & (number == np.round(number))
        cells = values.astype("string")
        cells[whole] = pd.Series(number[whole].astype(np.int64)).astype("string").to_numpy()
    else:
        cells = values.astype("string")
    cells = cells.str.strip()
    return cells.mask(cells.isin(NA_TEXTS))


def count_text(values: pd.Series) -> tuple[int, int]:
    """(text cells, number cells) of a column: its non-empty cells that are not numbers, and
    those that are."""
    if stored_as_numbers(values):
        return 0, int(values.notna().sum())
    cells = text_cells(values)
    present = cells.notna().to_numpy()
    number = pd.to_numeric(cells, errors="coerce").notna().to_numpy()
    return int((present & ~number).sum()), int((present & number).sum())


def is_text(values: pd.Series, kind: str) -> bool:
    """Whether a feature column is a text category column: not stored as numbers, and declared
    a category, or "auto" with at least as many text cells as numbers (and one at least)."""
    if (stored_as_numbers(values) or _not_text(values) is not None
            or kind not in ("category", "auto")):
        return False
    if kind == "category":
        return True
    text, numbers = count_text(values)
    return text > 0 and text >= numbers


def _not_text(values: pd.Series) -> str | None:
    """Why a column stored as true/false, dates or durations is neither numbers nor text
    categories (one category per date would be no model input), with the fix; else None."""
    if pd.api.types.is_bool_dtype(values):
        return "stored as true/false; store it as 0/1 (kind flag)"
    if pd.api.types.is_datetime64_any_dtype(values) or pd.api.types.is_timedelta64_dtype(values):
        return ("stored as dates or durations; convert it to a number, e.g. days since an event "
                "or a duration in days")
    return None


def not_numeric(col: str, kind: str | None, values: pd.Series) -> str:
    """Why a column that must hold numbers is refused, and the fix: counts only."""
    stored = _not_text(values)
    if stored is not None:
        return stored
    text, numbers = count_text(values)
    if not text:
        return (f"not numeric (stored as {values.dtype}); convert it to numbers, leaving "
                "unknown values empty")
    why = (f"among {numbers} numbers" if kind in (None, "auto")
           else f"in a column declared {kind}")
    return (f"not numeric: {text} of {len(values)} cells are text {why}; declare it a category "
            f'("kinds": {{"{col}": "category"}}) or clean the column, leaving unknown values '
            "empty")


def text_columns(df: pd.DataFrame, expected: list[str], schema: TableSchema,
                 where: str) -> list[str]:
    """The table's text category columns, in `expected` order; SiloDataError naming any other
    column not stored as numbers."""
    out = []
    for col in expected:
        if stored_as_numbers(df[col]):
            continue
        kind = schema.kind(col)
        if not is_text(df[col], kind):
            raise SiloDataError(f"{where}: column {col!r} is {not_numeric(col, kind, df[col])}")
        out.append(col)
    return out


def noisy_counts(counts: np.ndarray, rng: np.random.Generator | None,
                  sigma: float) -> np.ndarray:
    """Each value's count plus N(0, sigma^2) from `rng`, in order (exact with rng=None): what
    the histogram of a category column releases."""
    if rng is None:
        return counts.astype(np.float64)
    return counts + sigma * rng.standard_normal(len(counts))


def common_texts(cells: pd.Series, col: str, rng: np.random.Generator | None, sigma: float,
                  threshold: float) -> tuple[str, ...]:
    """The kept values of an undeclared text column: those whose count plus N(0, sigma^2) passes
    `threshold` (the same mechanism as numbers: clients/silo/data.py `_common_values`), at most
    `MAX_CATEGORIES` of them, the largest noisy counts (post-processing); in code point order.
    rng=None: every value seen up to the cap, exact, not private."""
    # value_counts, not np.unique over a fixed-width copy: one long free-text cell would make
    # that copy rows x longest cell x 4 bytes. Sorted by code point, as the draw order says.
    counted = cells.dropna().value_counts().sort_index()
    seen = counted.index.to_numpy(dtype=object)
    counts = counted.to_numpy(dtype=np.int64)
    noisy = noisy_counts(counts, rng, sigma)
    keep = np.flatnonzero(noisy > threshold)
    if len(keep) > MAX_CATEGORIES:
        log.info("column %s: %d values pass the threshold; the %d most common are kept, the "
                 "rest count as other", col, len(keep), MAX_CATEGORIES)
        keep = np.sort(keep[np.argsort(-noisy[keep], kind="stable")[:MAX_CATEGORIES]])
    return tuple(str(v) for v in seen[keep])


def one_hot_text(cells: pd.Series, kept: tuple[str, ...]) -> np.ndarray:
    """One 0/1 column per kept value, then `=other` (any other value), then `=missing`."""
    width = len(kept) + 2
    missing = cells.isna().to_numpy()
    # "" for a missing cell: never a kept value (kept values are stripped and non-empty).
    codes = pd.Index(list(kept), dtype=object).get_indexer(
        cells.fillna("").to_numpy(dtype=object))
    column = np.where(codes >= 0, codes, np.where(missing, width - 1, width - 2))
    out = np.zeros((len(cells), width))
    out[np.arange(len(cells)), column] = 1.0
    return out
