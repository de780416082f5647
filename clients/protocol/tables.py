"""Reading a party's table, whatever its format: the silos' feature tables and the authority's
label table are parquet, encrypted parquet (`.parquet.enc`, decrypted in memory) or CSV.

Shared by the silo side and the authority (server/labels.py), which reads its own label table
the same way; the error a table that cannot be used raises is the same on both sides.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from clients.protocol.schema import ID_COLUMN
from crypto.at_rest import Keystore, read_party_file


class SiloDataError(ValueError):
    """A silo table that cannot be used as it is."""


def read_table(path: Path, silo: str = "", store: Keystore | None = None,
               id_column: str = ID_COLUMN, text: Iterable[str] = ()) -> pd.DataFrame:
    """A table as a frame; an encrypted `.parquet.enc` is decrypted in memory with `store`.
    A CSV's `text` columns (declared text categories) are read as text, so "01" stays "01";
    its other columns' types are guessed over the whole file, not chunk by chunk (which split
    a column of "7" and "x" into "7" and "7.0")."""
    if path.name.endswith(".parquet.enc"):
        return pd.read_parquet(io.BytesIO(read_party_file(path, silo, store)))
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={id_column: "string", **dict.fromkeys(text, "string")},
                           low_memory=False)
    raise SiloDataError(f"unsupported table format {path.suffix!r} ({path}); use .parquet or .csv")
