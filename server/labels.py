"""The authority's own table: who it knows, whether they defaulted, and whether they may be
scored at all (the opening conditions of server/eligibility.py).

The table is read once: `load_authority` returns all three; `load_labels` and
`load_eligibility` are the single-purpose forms.

Which opening conditions a table can support: a generated table (no schema.json) holds all
three account-status columns. A table with a schema.json (real data, simulations/data/real_data.py)
lists the ones it holds in `eligibility_columns` (none when absent); a switched-on condition
whose column the schema does not declare is switched off, with an INFO log line saying why, so
real data runs under the default configuration. A declared (or generated-layout) column that is
missing from the table is an error naming the column and the switch that drops the condition.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clients.protocol.schema import AUTHORITY, SCHEMA_FILE, TableSchema, authority_schema
from clients.protocol.tables import read_table
from crypto.at_rest import Keystore
from crypto.identity import IdentifierError, unique_ids
from server.eligibility import (
    CARD,
    DEFAULT_DAYS,
    REAL_NAME,
    EligibilityConfig,
    EligibilityError,
    assess,
)

log = logging.getLogger(__name__)

# Column -> (config field, value that switches its condition off, dotted config key).
_SWITCHES = {
    REAL_NAME: ("require_real_name", False, "eligibility.require_real_name=false"),
    CARD: ("require_bound_card", False, "eligibility.require_bound_card=false"),
    DEFAULT_DAYS: ("severe_default_window_days", 0, "eligibility.severe_default_window_days=0"),
}


class LabelDataError(ValueError):
    """The authority's label table cannot be used as it is."""


@dataclass(frozen=True)
class _AuthorityTable:
    path: Path
    schema: TableSchema
    frame: pd.DataFrame
    ids: pd.Series  # normalised, one per row of `frame`


def _read_authority(authority_dir: Path, store: Keystore | None) -> _AuthorityTable:
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
    try:
        ids = unique_ids(df[id_col], schema.id_format)
    except IdentifierError as exc:
        raise LabelDataError(f"{path}: {exc}") from None
    return _AuthorityTable(path, schema, df, ids)


def _labels(table: _AuthorityTable) -> np.ndarray:
    label_col = table.schema.label_column
    labels = pd.to_numeric(table.frame[label_col], errors="coerce")
    if labels.isna().any() or not labels.isin((0, 1)).all():
        raise LabelDataError(
            f"{table.path}: column {label_col!r} must be 0 or 1 in every row "
            f"({int((~labels.isin((0, 1))).sum())} rows are not); fix or drop them"
        )
    return labels.to_numpy(dtype=np.int8)


def supported_config(cfg: EligibilityConfig, schema: TableSchema) -> EligibilityConfig:
    """`cfg` with the conditions switched off whose columns the table's schema does not declare
    (real data); unchanged for the generated layout (no schema.json)."""
    if schema.eligibility_columns is None:
        return cfg
    changes: dict[str, Any] = {}
    for column in cfg.required_columns():
        if column not in schema.eligibility_columns:
            name, off, _ = _SWITCHES[column]
            changes[name] = off
            log.info("eligibility: %s off: the authority's %s declares no %r column (real data "
                     "without that account status)", name, SCHEMA_FILE, column)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _eligibility(table: _AuthorityTable, cfg: EligibilityConfig, rows: np.ndarray
                 ) -> pd.DataFrame:
    cfg = supported_config(cfg, table.schema)
    missing = [c for c in cfg.required_columns() if c not in table.frame.columns]
    if missing:
        fixes = " ".join(f"--set {_SWITCHES[c][2]}" for c in missing)
        raise LabelDataError(
            f"{table.path.name}: the opening conditions need column(s) {', '.join(missing)}, "
            "which the table lacks: regenerate the parties (`fedscore generate --parties DIR "
            f"--overwrite`), add the column(s), or switch the condition(s) off ({fixes})")
    frame = table.frame[cfg.required_columns()].iloc[rows].reset_index(drop=True)
    try:
        return assess(frame, cfg)
    except EligibilityError as exc:
        raise LabelDataError(f"{table.path.name}: {exc}") from None


def load_labels(authority_dir: Path, store: Keystore | None = None
                ) -> tuple[pd.Series, np.ndarray]:
    """Normalised identifiers and 0/1 labels from `<authority_dir>/labels.parquet` (or .csv,
    or .parquet.enc decrypted with `store`)."""
    table = _read_authority(authority_dir, store)
    return table.ids, _labels(table)


def load_eligibility(authority_dir: Path, store: Keystore | None, cfg: EligibilityConfig,
                     ids: pd.Series) -> pd.DataFrame:
    """`server.eligibility.assess` of the authority's people, row i = person `ids[i]`
    (normalised identifiers, e.g. from load_labels; any order); index 0..len(ids)-1."""
    table = _read_authority(authority_dir, store)
    rows = pd.Index(table.ids).get_indexer(pd.Index(ids))
    unknown = int((rows < 0).sum())
    if unknown:
        raise LabelDataError(
            f"{table.path.name}: {unknown} of {len(rows)} requested people are not in the "
            "authority's table; pass identifiers from load_labels of the same folder")
    return _eligibility(table, cfg, rows)


def load_authority(authority_dir: Path, store: Keystore | None, cfg: EligibilityConfig
                   ) -> tuple[pd.Series, np.ndarray, pd.DataFrame]:
    """Identifiers, labels and eligibility (row i = person i), reading the table once."""
    table = _read_authority(authority_dir, store)
    labels = _labels(table)
    return table.ids, labels, _eligibility(table, cfg, np.arange(len(table.ids)))
