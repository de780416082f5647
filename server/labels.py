"""The authority's own table: who it knows and whether they defaulted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clients.schema import AUTHORITY, authority_schema
from clients.silo_data import read_table
from crypto.at_rest import Keystore
from crypto.identity import IdentifierError, normalize_ids


class LabelDataError(ValueError):
    """The authority's label table cannot be used as it is."""


def load_labels(authority_dir: Path, store: Keystore | None = None
                ) -> tuple[pd.Series, np.ndarray]:
    """Normalised identifiers and 0/1 labels from `<authority_dir>/labels.parquet` (or .csv,
    or .parquet.enc decrypted with `store`)."""
    for name in ("labels.parquet", "labels.parquet.enc", "labels.csv"):
        path = authority_dir / name
        if path.exists():
            break
    else:
        raise LabelDataError(
            f"no label table in {authority_dir}: expected labels.parquet or labels.csv; "
            "generate party tables with `fedscore generate --parties DIR`"
        )
    try:
        schema = authority_schema(authority_dir)
    except ValueError as exc:
        raise LabelDataError(str(exc)) from None
    id_col, label_col = schema.id_column, schema.label_column
    df = read_table(path, AUTHORITY, store, id_col)
    for col in (id_col, label_col):
        if col not in df.columns:
            raise LabelDataError(f"{path}: no column {col!r}; the label table needs "
                                 f"{id_col!r} and {label_col!r}")
    labels = pd.to_numeric(df[label_col], errors="coerce")
    if labels.isna().any() or not labels.isin((0, 1)).all():
        raise LabelDataError(
            f"{path}: column {label_col!r} must be 0 or 1 in every row "
            f"({int((~labels.isin((0, 1))).sum())} rows are not); fix or drop them"
        )
    try:
        ids = normalize_ids(df[id_col], schema.id_kind)
    except IdentifierError as exc:
        raise LabelDataError(f"{path}: {exc}") from None
    dup = int(ids.duplicated().sum())
    if dup:
        raise LabelDataError(f"{path}: {dup} identifiers appear more than once; keep one row each")
    return ids, labels.to_numpy(dtype=np.int8)
