"""Corrections a silo accepted after a dispute, kept beside its table and never inside it.

The silo's table stays as delivered; `corrections.json` (encrypted at rest with the silo's
keystore, `.json.enc`) lists the corrected values, keyed by the silo's own identifier of the
person, which never leaves the silo. The matrix the silo scores with is the table with the
corrections applied, prepared with the statistics of the original table (so one correction
changes that person's inputs only).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.schema import SILO_FEATURES, silo_schema
from clients.protocol.tables import SiloDataError, read_table
from clients.silo.data import SiloMatrix, find_table
from crypto.at_rest import Keystore, read_encrypted, write_encrypted
from crypto.identity import normalize_ids

log = logging.getLogger(__name__)

FILE = "corrections.json"


def path(silo_dir: Path) -> Path | None:
    """The silo's corrections file, or None when it has none."""
    for name in (f"{FILE}.enc", FILE):
        if (silo_dir / name).exists():
            return silo_dir / name
    return None


def _context(silo: str) -> bytes:
    return f"fedscore/silo/{silo}/{FILE}".encode()


def load(silo_dir: Path, silo: str, store: Keystore | None) -> list[dict]:
    found = path(silo_dir)
    if found is None:
        return []
    if found.suffix == ".enc":
        if store is None:
            raise SiloDataError(f"{found} is encrypted; start the silo with its keystore")
        data = read_encrypted(store, found, _context(silo))
    else:
        data = found.read_bytes()
    return list(json.loads(data)["corrections"])


def _save(silo_dir: Path, silo: str, store: Keystore | None, items: list[dict]) -> None:
    data = json.dumps({"corrections": items}, sort_keys=True).encode()
    if store is not None:
        write_encrypted(store, silo_dir / f"{FILE}.enc", data, _context(silo))
    else:
        tmp = silo_dir / f"{FILE}.partial"
        tmp.write_bytes(data)
        tmp.replace(silo_dir / FILE)


def check_value(silo: str, field: str, given: object, features: list[str],
                text_fields: Collection[str] = ()) -> float:
    """The corrected value, if it is one the field can hold; else a SiloDataError naming why.
    A text category field is not correctable here (its value is a word, never echoed)."""
    if field not in features:
        raise SiloDataError(f"silo {silo!r} has no field {field!r}; correctable fields: "
                            f"{', '.join(features)}")
    if field in text_fields:
        raise SiloDataError(f"{field} holds text categories and corrections take numbers only; "
                            "correct it in the silo's table instead")
    try:
        value = float(given)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SiloDataError(f"{field}: give a number") from None
    if not math.isfinite(value):
        raise SiloDataError(f"{field}={value}: give a finite number")
    kind = {f.name: f.kind for f in SILO_FEATURES.get(silo, ())}.get(field, "real")
    if kind in ("amount", "count") and value < 0:
        raise SiloDataError(f"{field}={value:g}: a {kind} cannot be negative")
    if kind == "count" and not float(value).is_integer():
        raise SiloDataError(f"{field}={value:g}: a count is a whole number")
    if kind == "rate" and not 0 <= value <= 1:
        raise SiloDataError(f"{field}={value:g}: a rate lies in 0..1 (e.g. 0.95 for 95 %)")
    if kind == "flag" and value not in (0, 1):
        raise SiloDataError(f"{field}={value:g}: a flag is 0 or 1")
    return float(value)


def record(silo_dir: Path, silo: str, store: Keystore | None, person: str, field: str,
           value: float, category: str) -> int:
    """Add one correction (the silo's identifier `person`); returns how many the silo holds."""
    items = load(silo_dir, silo, store)
    items.append({"id": person, "field": field, "value": value, "category": category,
                  "at": datetime.now(UTC).isoformat(timespec="seconds")})
    _save(silo_dir, silo, store, items)
    log.info("silo %s recorded a correction of %s (%d in all)", silo, field, len(items))
    return len(items)


def apply(matrix: SiloMatrix, silo_dir: Path, silo: str, store: Keystore | None,
          items: list[dict]) -> SiloMatrix:
    """The matrix with the corrected people's rows re-prepared from the corrected table."""
    if not items:
        return matrix
    schema = silo_schema(silo_dir, silo)
    table = read_table(find_table(silo_dir), silo, store, schema.id_column,
                       schema.declared_text())
    ids = normalize_ids(table[schema.id_column], schema.id_format)
    latest = pd.DataFrame(items).drop_duplicates(["id", "field"], keep="last")
    rows = pd.Index(ids).get_indexer(latest["id"])
    if (rows < 0).any():
        raise SiloDataError(f"silo {silo!r}: {int((rows < 0).sum())} correction(s) name people "
                            "no longer in the table; remove them from the corrections file")
    for field, part in latest.assign(row=rows).groupby("field"):
        table.loc[table.index[part["row"].to_numpy()], field] = part["value"].to_numpy()
    changed = np.unique(rows)
    if matrix.prep is None:
        raise SiloDataError(f"silo {silo!r}: the matrix carries no preparation to re-apply")
    x = matrix.x.copy()
    x[changed] = matrix.prep.transform(table.iloc[changed])
    return SiloMatrix(x=x, columns=matrix.columns, ids=matrix.ids, prep=matrix.prep)
