"""A region's table (horizontal topology): all features of its own customers, and labels.

Model inputs come from a FIXED map taken from the public schema, not from statistics of the
region's data: counts and amounts become log1p(x) over a constant, rates and flags stay in
[0, 1], the contacts' average standing is placed on the public 300..850 score scale, and every
feature gets a missing-value indicator (the cell itself becomes 0). Fitted standardisation, as
the vertical silos do, would differ between skewed regions (the same input would mean different
things in different regions' models) and sharing the statistics would release aggregates
outside the DP guarantee. The cost of the fixed map is measured against fitted preparation in
bench/RESULTS.md.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.region import feature_columns
from clients.protocol.schema import ID_COLUMN, LABEL_COLUMN
from crypto.at_rest import Keystore, read_party_file
from crypto.secret_random import SecretRandom

REGION_TABLE = "customers.parquet"
REGIONS_FILE = "regions.json"
SPLITS = ("train", "val", "test")

# log1p(x) / scale: about 1 at a large but ordinary value of each kind.
LOG_SCALE = {"count": np.log1p(100.0), "amount": np.log1p(100_000.0)}
# "real" features are scores of contacts, on the public 300..850 scale.
REAL_CENTRE, REAL_HALF_RANGE = 575.0, 275.0


class RegionDataError(ValueError):
    """A region table that cannot be used as it is."""


def region_names(regions: int) -> list[str]:
    return [f"region_{k + 1}" for k in range(regions)]


def listed_regions(root: Path) -> list[str]:
    """The regions of a horizontal parties directory, in partition-id order."""
    path = Path(root) / REGIONS_FILE
    if not path.exists():
        raise RegionDataError(f"{root} has no {REGIONS_FILE}: it is not a horizontal parties "
                              "directory (run with --set topology=horizontal to make one)")
    return list(json.loads(path.read_text())["regions"])


def region_inputs(df: pd.DataFrame) -> np.ndarray:
    """Model inputs (float32, `input_columns()` in order) by the fixed public map."""
    columns = feature_columns()
    absent = [c for c, _ in columns if c not in df.columns]
    if absent:
        raise RegionDataError(f"missing column(s) {', '.join(absent)}; add them (empty values "
                              "are allowed) or fix the column names")
    try:
        raw = df[[c for c, _ in columns]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise RegionDataError("feature columns must be numeric; convert them to numbers, "
                              "leaving unknown values empty") from None
    if np.isinf(raw).any():
        raise RegionDataError("infinite values; replace them with real numbers or leave them "
                              "empty")
    nan = np.isnan(raw)
    x = np.zeros_like(raw)
    for j, (_, kind) in enumerate(columns):
        col = raw[:, j]
        if kind in LOG_SCALE:
            x[:, j] = np.log1p(np.maximum(col, 0.0)) / LOG_SCALE[kind]
        elif kind == "real":
            x[:, j] = (col - REAL_CENTRE) / REAL_HALF_RANGE
        else:  # rate, flag: already on 0..1
            x[:, j] = col
    x = np.where(nan, 0.0, x)
    return np.hstack([x, nan.astype(np.float64)]).astype(np.float32)


def region_split(n: int, random: SecretRandom, seed: int, train: float, val: float
                 ) -> np.ndarray:
    """Split code per customer (0 train, 1 val, 2 test): a permutation drawn from the region's
    secret stream, so nobody without the region's keystore can tell who trained the model
    (splits are among the draws an adversary must not predict). The same keystore and seed
    give the same split, so a resumed or repeated run keeps it."""
    rng = random.generator("region-split", seed)
    order = rng.permutation(n)
    codes = np.full(n, 2, dtype=np.int8)
    n_train, n_val = round(train * n), round(val * n)
    codes[order[:n_train]] = 0
    codes[order[n_train:n_train + n_val]] = 1
    return codes


@dataclass
class RegionData:
    x: np.ndarray  # float32 (n, d)
    y: np.ndarray  # float32 0/1
    ids: pd.Series  # E.164; never leaves the region

    def __len__(self) -> int:
        return len(self.y)


def read_region_table(region_dir: Path, region: str, store: Keystore | None) -> pd.DataFrame:
    plain, sealed = region_dir / REGION_TABLE, region_dir / f"{REGION_TABLE}.enc"
    if sealed.exists():
        return pd.read_parquet(io.BytesIO(read_party_file(sealed, region, store)))
    if plain.exists():
        return pd.read_parquet(plain)
    raise RegionDataError(f"region {region!r}: no {REGION_TABLE} in {region_dir}; generate "
                          "the regions with `fedscore run --set topology=horizontal`")


def load_region(region_dir: Path, region: str, store: Keystore | None = None) -> RegionData:
    """The region's customers as model inputs and labels, validated."""
    df = read_region_table(region_dir, region, store)
    where = f"region {region!r}"
    if LABEL_COLUMN not in df.columns or ID_COLUMN not in df.columns:
        raise RegionDataError(f"{where}: the table needs {ID_COLUMN!r} and {LABEL_COLUMN!r} "
                              "columns")
    y = pd.to_numeric(df[LABEL_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise RegionDataError(f"{where}: {int(bad.sum())} label(s) are not 0 or 1 (or are "
                              "empty); fix or drop those rows")
    if len(df) < 10:
        raise RegionDataError(f"{where}: only {len(df)} customers; a region needs at least 10")
    try:
        x = region_inputs(df)
    except RegionDataError as exc:
        raise RegionDataError(f"{where}: {exc}") from None
    return RegionData(x=x, y=y.astype(np.float32), ids=df[ID_COLUMN].astype(str))
