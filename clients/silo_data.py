"""A silo's table: load, validate, and turn into a model-ready matrix.

Everything here runs inside the silo. Validation errors name the problem and the fix but never
echo an identifier. Missing values are normal: they are imputed with the column median and get a
missing-value indicator column, so the model can learn what absence means.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.schema import ID_COLUMN, TableSchema, silo_schema
from crypto.at_rest import Keystore, read_party_file
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


@dataclass
class SiloMatrix:
    """Model-ready features of one silo, row i = table row i."""

    x: np.ndarray  # float32 (n, d)
    columns: list[str]  # names of x's columns, indicators last
    ids: pd.Series  # normalised identifiers, E.164; never leaves the silo


def prepare(df: pd.DataFrame, silo: str, expected: list[str],
            schema: TableSchema | None = None) -> SiloMatrix:
    """Validate, then: log1p for skewed non-negative columns (signed log1p for `signed_log`
    columns), median imputation with missing indicators, standardisation; `category` columns
    become one-hot columns instead. All statistics come from the silo's own table."""
    schema = schema or TableSchema()
    ids = validate(df, silo, expected, schema)
    categorical = [c for c in expected if schema.kind(c) == "category"]
    numeric = [c for c in expected if c not in categorical]
    x, columns = _numeric_block(df, silo, numeric, schema)
    blocks, names = [x], [columns]
    for col in categorical:
        block, block_names = _one_hot(df[col], col)
        blocks.append(block)
        names.append(block_names)
    matrix = np.hstack(blocks).astype(np.float32)
    columns = [c for group in names for c in group]
    log.debug("silo %s: %d rows, %d model inputs", silo, len(matrix), matrix.shape[1])
    return SiloMatrix(x=matrix, columns=columns, ids=ids)


# Beyond this many distinct values a "category" column is probably an amount or an id.
MAX_CATEGORIES = 64


def _one_hot(values: pd.Series, col: str) -> tuple[np.ndarray, list[str]]:
    """One 0/1 column per observed value (missing values get their own column)."""
    codes, uniques = pd.factorize(values, sort=True, use_na_sentinel=True)
    if len(uniques) > MAX_CATEGORIES:
        raise SiloDataError(f"column {col!r} is declared a category but has {len(uniques)} "
                            f"distinct values (more than {MAX_CATEGORIES}); declare it auto")
    width = len(uniques) + int((codes < 0).any())
    out = np.zeros((len(codes), width))
    out[np.arange(len(codes)), np.where(codes < 0, width - 1, codes)] = 1.0
    names = [f"{col}={v:g}" for v in uniques] + ([f"{col}=missing"] if width > len(uniques)
                                                 else [])
    return out, names


def _numeric_block(df: pd.DataFrame, silo: str, expected: list[str], schema: TableSchema
                   ) -> tuple[np.ndarray, list[str]]:
    if not expected:
        return np.zeros((len(df), 0)), []
    raw = df[expected].to_numpy(dtype=np.float64)
    nan = np.isnan(raw)
    if nan.all(axis=0).any():
        empty = [c for c, e in zip(expected, nan.all(axis=0), strict=True) if e]
        raise SiloDataError(
            f"silo {silo!r}: column(s) {', '.join(empty)} are entirely empty; drop them from "
            "the table and the schema, or fill them"
        )
    x = raw.copy()
    nonneg = np.nanmin(x, axis=0) >= 0
    mean, std = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
    median = np.nanmedian(x, axis=0)
    # Heavy right tails (amounts, counts) dominate a linear layer; log1p tames them.
    skewed = nonneg & (mean > 0) & (std > 2 * np.maximum(median, 1e-9)) & (np.nanmax(x, 0) > 10)
    signed = np.array([schema.kind(c) == "signed_log" for c in expected], dtype=bool)
    x[:, skewed & ~signed] = np.log1p(x[:, skewed & ~signed])
    x[:, signed] = np.sign(x[:, signed]) * np.log1p(np.abs(x[:, signed]))
    x = np.where(nan, np.nanmedian(x, axis=0), x)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    has_nan = nan.any(axis=0)
    indicators = nan[:, has_nan].astype(np.float64)
    flagged = [c for c, h in zip(expected, has_nan, strict=True) if h]
    columns = list(expected) + [f"{c}__missing" for c in flagged]
    return np.hstack([x, indicators]), columns


def load_silo(silo_dir: Path, silo: str, store: Keystore | None = None) -> SiloMatrix:
    """The silo's table, validated against its schema (schema.json, or the generated layout)."""
    try:
        schema = silo_schema(silo_dir, silo)
    except ValueError as exc:
        raise SiloDataError(f"silo {silo!r}: {exc}") from None
    table = read_table(find_table(silo_dir), silo, store, schema.id_column)
    return prepare(table, silo, list(schema.features), schema)
