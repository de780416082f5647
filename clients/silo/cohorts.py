"""A silo's later cohorts: the same people observed later, for drift monitoring.

`<silo_dir>/cohorts/<name>/features.parquet` (or `.parquet.enc`): the same people as the silo's
table, in the same order, observed later. An encrypted cohort is bound to the silo and to the
cohort's name, so it can pass neither for the silo's own table nor for another cohort.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.schema import silo_schema
from clients.protocol.tables import SiloDataError
from clients.silo.data import SiloMatrix, validate
from crypto.at_rest import AtRestError, Keystore, party_context, read_encrypted

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
                            "simulations.data.cohort.write_later_cohort")
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
