"""A silo's table: load, validate, and turn into a model-ready matrix.

Everything here runs inside the silo. Validation errors name the problem and the fix but never
echo an identifier. Missing values are normal: they are imputed with the column median and get a
missing-value indicator column, so the model can learn what absence means.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.schema import ID_COLUMN, TableSchema, silo_schema
from crypto.at_rest import AtRestError, Keystore, party_context, read_encrypted, read_party_file
from crypto.identity import IdentifierError, normalize_ids

log = logging.getLogger(__name__)

TABLE_NAMES = ("features.parquet", "features.parquet.enc", "features.csv")


class SiloDataError(ValueError):
    """A silo table that cannot be used as it is."""


def find_table(silo_dir: Path) -> Path:
    for name in TABLE_NAMES:
        if (silo_dir / name).exists():
            return silo_dir / name
    raise SiloDataError(
        f"no table in {silo_dir}: expected one of {', '.join(TABLE_NAMES)}; "
        "generate party tables with `fedscore generate --parties DIR`"
    )


def read_table(path: Path, silo: str = "", store: Keystore | None = None,
               id_column: str = ID_COLUMN) -> pd.DataFrame:
    """A table as a frame; an encrypted `.parquet.enc` is decrypted in memory with `store`."""
    if path.name.endswith(".parquet.enc"):
        return pd.read_parquet(io.BytesIO(read_party_file(path, silo, store)))
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={id_column: "string"})
    raise SiloDataError(f"unsupported table format {path.suffix!r} ({path}); use .parquet or .csv")


def validate(df: pd.DataFrame, silo: str, expected: list[str],
             schema: TableSchema | None = None) -> pd.Series:
    """Check `df` against the expected feature columns; return the normalised identifiers."""
    schema = schema or TableSchema()
    id_column = schema.id_column
    where = f"silo {silo!r}"
    if id_column not in df.columns:
        raise SiloDataError(
            f"{where}: no identifier column {id_column!r}; rename the identifier column "
            f"to {id_column!r}"
        )
    features = [c for c in df.columns if c != id_column]
    missing = [c for c in expected if c not in features]
    extra = [c for c in features if c not in expected]
    if missing:
        raise SiloDataError(
            f"{where}: missing column(s) {', '.join(missing)}; add them "
            "(empty values are allowed) or fix the column names"
        )
    if extra:
        raise SiloDataError(
            f"{where}: unexpected column(s) {', '.join(extra)}; drop them or declare them "
            "in the silo's schema"
        )
    if len(df) == 0:
        raise SiloDataError(f"{where}: the table has no rows")
    for col in expected:
        if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            raise SiloDataError(
                f"{where}: column {col!r} is not numeric (dtype {df[col].dtype}); convert it "
                "to numbers, leaving unknown values empty"
            )
    values = df[expected].to_numpy(dtype=np.float64)
    inf_cols = [c for c, bad in zip(expected, np.isinf(values).any(axis=0), strict=True) if bad]
    if inf_cols:
        raise SiloDataError(
            f"{where}: column(s) {', '.join(inf_cols)} hold infinite values; replace them "
            "with real numbers or leave them empty"
        )
    try:
        ids = normalize_ids(df[id_column], schema.id_kind)
    except IdentifierError as exc:
        raise SiloDataError(f"{where}: {exc}") from None
    dup = int(ids.duplicated().sum())
    if dup:
        raise SiloDataError(
            f"{where}: {dup} identifiers appear more than once (after normalisation); "
            "keep one row per person"
        )
    return ids


# Beyond this many distinct values a "category" column is probably an amount or an id.
MAX_CATEGORIES = 64


def _frozen(values: np.ndarray) -> np.ndarray:
    out = np.array(values)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Preparation:
    """How a silo turns its table into model inputs, fitted once on the training table and
    applied unchanged to other rows (a later cohort, new applicants), so that a shift in the
    data shows up in the inputs instead of being standardised away.

    Numeric columns: log1p where the fitted column was skewed and non-negative (values below 0
    in new rows are clipped to 0 first: log1p is only defined there, and such a column had none
    at fit time), sign(x) log1p |x| for `signed_log` columns, the fitted median for missing
    cells, then the fitted mean and standard deviation. A `__missing` indicator column exists
    for exactly the columns that had missing cells at fit time: the model's inputs are fixed
    then, so a new missing cell in another column is imputed with the median, without an
    indicator, and a column entirely empty in the new rows is imputed throughout.
    Category columns: one 0/1 column per value seen at fit time, plus `=missing` if the column
    had missing cells then. A value never seen at fit time (or a missing cell when there is no
    `=missing` column) gives an all-zero row: the person is like no group the model knows,
    which is neutral for its first layer, rather than being counted as missing.
    """

    silo: str
    numeric: tuple[str, ...]
    skewed: np.ndarray  # bool per numeric column: log1p
    signed: np.ndarray  # bool per numeric column: sign(x) log1p |x|
    median: np.ndarray  # per numeric column, after the log transforms
    mean: np.ndarray
    scale: np.ndarray  # the standard deviation, 1 where it was 0
    indicators: tuple[str, ...]  # numeric columns with a missing-value indicator
    # (column, values seen at fit time in sorted order, whether it has a `=missing` column)
    categories: tuple[tuple[str, tuple[float, ...], bool], ...]
    columns: tuple[str, ...]  # names of the model inputs, in order

    @classmethod
    def fit(cls, df: pd.DataFrame, silo: str, expected: list[str],
            schema: TableSchema | None = None) -> Preparation:
        """Statistics from `df` (already validated, e.g. by `validate`)."""
        schema = schema or TableSchema()
        categorical = [c for c in expected if schema.kind(c) == "category"]
        numeric = [c for c in expected if c not in categorical]
        raw = df[numeric].to_numpy(dtype=np.float64)
        nan = np.isnan(raw)
        if numeric and nan.all(axis=0).any():
            empty = [c for c, e in zip(numeric, nan.all(axis=0), strict=True) if e]
            raise SiloDataError(
                f"silo {silo!r}: column(s) {', '.join(empty)} are entirely empty; drop them "
                "from the table and the schema, or fill them"
            )
        signed = np.array([schema.kind(c) == "signed_log" for c in numeric], dtype=bool)
        if numeric:
            nonneg = np.nanmin(raw, axis=0) >= 0
            mean, std = np.nanmean(raw, axis=0), np.nanstd(raw, axis=0)
            median = np.nanmedian(raw, axis=0)
            # Heavy right tails (amounts, counts) dominate a linear layer; log1p tames them.
            skewed = (nonneg & (mean > 0) & (std > 2 * np.maximum(median, 1e-9))
                      & (np.nanmax(raw, 0) > 10))
        else:
            skewed = np.zeros(0, dtype=bool)
        x = _log_transforms(raw, skewed, signed)
        fill = np.nanmedian(x, axis=0) if numeric else np.zeros(0)
        x = np.where(nan, fill, x)
        mu, sd = x.mean(axis=0), x.std(axis=0)
        has_nan = nan.any(axis=0)
        indicators = tuple(c for c, h in zip(numeric, has_nan, strict=True) if h)
        names = [*numeric, *(f"{c}__missing" for c in indicators)]
        categories = []
        for col in categorical:
            uniques = pd.unique(df[col].dropna().to_numpy(dtype=np.float64))
            uniques = np.sort(uniques)
            if len(uniques) > MAX_CATEGORIES:
                raise SiloDataError(
                    f"column {col!r} is declared a category but has {len(uniques)} distinct "
                    f"values (more than {MAX_CATEGORIES}); declare it auto")
            missing = bool(df[col].isna().any())
            categories.append((col, tuple(float(v) for v in uniques), missing))
            names += [f"{col}={v:g}" for v in uniques] + ([f"{col}=missing"] if missing else [])
        return cls(silo, tuple(numeric), _frozen(skewed & ~signed), _frozen(signed),
                   _frozen(fill), _frozen(mu), _frozen(np.where(sd > 0, sd, 1.0)), indicators,
                   tuple(categories), tuple(names))

    @property
    def features(self) -> tuple[str, ...]:
        """The table columns this preparation reads."""
        return (*self.numeric, *(c for c, _, _ in self.categories))

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Model inputs (float32, one row per row of `df`, `columns` in order) with the fitted
        statistics; on the table it was fitted on, exactly what `prepare` returns."""
        where = f"silo {self.silo!r}"
        absent = [c for c in self.features if c not in df.columns]
        if absent:
            raise SiloDataError(f"{where}: missing column(s) {', '.join(absent)}; add them "
                                "(empty values are allowed) or fix the column names")
        for col in self.features:
            if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
                raise SiloDataError(f"{where}: column {col!r} is not numeric (dtype "
                                    f"{df[col].dtype}); convert it to numbers, leaving unknown "
                                    "values empty")
        raw = df[list(self.numeric)].to_numpy(dtype=np.float64, copy=True)
        if np.isinf(raw).any():
            raise SiloDataError(f"{where}: infinite values; replace them with real numbers or "
                                "leave them empty")
        nan = np.isnan(raw)
        # `raw` is this call's own copy (copy=True), so every step works in place: a
        # million-row table costs one float64 copy and the float32 result, not five copies.
        np.maximum(raw, 0.0, out=raw, where=self.skewed[None, :] & ~nan)
        x = _log_transforms(raw, self.skewed, self.signed, in_place=True)
        np.copyto(x, np.broadcast_to(self.median, x.shape), where=nan)
        x -= self.mean
        x /= self.scale
        flagged = [self.numeric.index(c) for c in self.indicators]
        widths = [len(v) + int(m) for _, v, m in self.categories]
        out = np.empty((len(x), x.shape[1] + len(flagged) + sum(widths)), dtype=np.float32)
        out[:, : x.shape[1]] = x
        out[:, x.shape[1] : x.shape[1] + len(flagged)] = nan[:, flagged]
        start = x.shape[1] + len(flagged)
        for (col, values, missing), width in zip(self.categories, widths, strict=True):
            out[:, start : start + width] = _one_hot(df[col].to_numpy(dtype=np.float64),
                                                     values, missing)
            start += width
        return out


def _log_transforms(raw: np.ndarray, skewed: np.ndarray, signed: np.ndarray,
                    in_place: bool = False) -> np.ndarray:
    x = raw if in_place else raw.copy()
    x[:, skewed & ~signed] = np.log1p(x[:, skewed & ~signed])
    x[:, signed] = np.sign(x[:, signed]) * np.log1p(np.abs(x[:, signed]))
    return x


def _one_hot(values: np.ndarray, categories: tuple[float, ...], missing: bool) -> np.ndarray:
    """One 0/1 column per fitted value (then `=missing` if fitted); unseen values: all zero."""
    known = np.asarray(categories, dtype=np.float64)
    width = len(known) + int(missing)
    out = np.zeros((len(values), width))
    pos = np.searchsorted(known, values)
    found = (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == values) \
        if len(known) else np.zeros(len(values), dtype=bool)
    column = np.where(found, pos, -1)
    if missing:
        column = np.where(np.isnan(values), width - 1, column)
    rows = np.flatnonzero(column >= 0)
    out[rows, column[rows]] = 1.0
    return out


@dataclass
class SiloMatrix:
    """Model-ready features of one silo, row i = table row i."""

    x: np.ndarray  # float32 (n, d)
    columns: list[str]  # names of x's columns, indicators last
    ids: pd.Series  # normalised identifiers, E.164; never leaves the silo
    # The fitted preparation, to turn other rows (a later cohort) into inputs the same way.
    prep: Preparation | None = None


def prepare(df: pd.DataFrame, silo: str, expected: list[str],
            schema: TableSchema | None = None) -> SiloMatrix:
    """Validate, fit a `Preparation` on the table and apply it: log1p for skewed non-negative
    columns (signed log1p for `signed_log` columns), median imputation with missing indicators,
    standardisation; `category` columns become one-hot columns instead. All statistics come
    from the silo's own table."""
    schema = schema or TableSchema()
    ids = validate(df, silo, expected, schema)
    prep = Preparation.fit(df, silo, expected, schema)
    matrix = prep.transform(df)
    log.debug("silo %s: %d rows, %d model inputs", silo, len(matrix), matrix.shape[1])
    return SiloMatrix(x=matrix, columns=list(prep.columns), ids=ids, prep=prep)


def load_silo(silo_dir: Path, silo: str, store: Keystore | None = None) -> SiloMatrix:
    """The silo's table, validated against its schema (schema.json, or the generated layout)."""
    try:
        schema = silo_schema(silo_dir, silo)
    except ValueError as exc:
        raise SiloDataError(f"silo {silo!r}: {exc}") from None
    table = read_table(find_table(silo_dir), silo, store, schema.id_column)
    return prepare(table, silo, list(schema.features), schema)


# ---- later cohorts (drift monitoring) ----------------------------------------------------------
# `<silo_dir>/cohorts/<name>/features.parquet` (or `.parquet.enc`): the same people as the silo's
# table, in the same order, observed later. An encrypted cohort is bound to the silo and to the
# cohort's name, so it can pass neither for the silo's own table nor for another cohort.

COHORTS_DIR = "cohorts"
COHORT_TABLE = "features.parquet"
COHORT_INFO = "cohort.json"
_COHORT_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


def check_cohort_name(name: str) -> str:
    if not isinstance(name, str) or not _COHORT_NAME.fullmatch(name):
        raise SiloDataError(f"cohort name {name!r}: use 1 to 40 letters, digits, '_' or '-', "
                            "e.g. later or 2024-q3")
    return name


def cohort_dir(silo_dir: Path, name: str) -> Path:
    return Path(silo_dir) / COHORTS_DIR / check_cohort_name(name)


def cohort_context(silo: str, name: str) -> bytes:
    """What an encrypted cohort table is bound to: the silo, and the cohort's name."""
    return party_context(silo, f"{COHORTS_DIR}/{check_cohort_name(name)}/{COHORT_TABLE}")


def load_cohort(silo_dir: Path, silo: str, name: str, store: Keystore | None,
                base: SiloMatrix) -> np.ndarray:
    """A later cohort of the silo's people as model inputs prepared with the TRAINING table's
    statistics (`base.prep`), so a shift in behaviour shows up as drift instead of being
    standardised away. The cohort must hold exactly base's people, in base's row order."""
    folder = cohort_dir(silo_dir, name)
    where = f"silo {silo!r}, cohort {name!r}"
    if base.prep is None:
        raise SiloDataError(f"{where}: the base matrix has no fitted preparation; build it with "
                            "prepare() or load_silo()")
    plain, encrypted = folder / COHORT_TABLE, folder / (COHORT_TABLE + ".enc")
    if encrypted.exists():
        if store is None:
            raise AtRestError(f"{encrypted} is encrypted; give the keystore it was written with "
                              "(`--set storage.keystore=DIR`, or node config `keystore=DIR`)")
        df = pd.read_parquet(io.BytesIO(read_encrypted(store, encrypted,
                                                       cohort_context(silo, name))))
    elif plain.exists():
        df = pd.read_parquet(plain)
    else:
        raise SiloDataError(f"{where}: no table in {folder} (expected {COHORT_TABLE} or "
                            f"{COHORT_TABLE}.enc); write one with "
                            "simulations.population.write_later_cohort")
    try:
        schema = silo_schema(Path(silo_dir), silo)
    except ValueError as exc:
        raise SiloDataError(f"silo {silo!r}: {exc}") from None
    ids = validate(df, silo, list(schema.features), schema)
    if len(ids) != len(base.ids):
        raise SiloDataError(f"{where}: {len(ids)} rows, but the training table has "
                            f"{len(base.ids)}; a cohort holds the same people in the same order")
    differ = int((ids.to_numpy() != base.ids.to_numpy()).sum())
    if differ:
        raise SiloDataError(f"{where}: {differ} of {len(ids)} rows hold another person than the "
                            "training table's row; write the cohort in the training table's "
                            "row order")
    return base.prep.transform(df)
