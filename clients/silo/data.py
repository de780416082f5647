"""A silo's table: load, validate, and turn into a model-ready matrix.

Everything here runs inside the silo. Validation errors name the problem and the fix but never
echo an identifier. Missing values are normal: every numeric column has a missing-value
indicator column, so the model can learn what absence means.

No private statistic shapes the model unaccounted (DESIGN "Privacy model"): transforms and
clipping ranges are fixed by the declared column kinds, and the statistics fitted on the table
are released once per table through one Gaussian mechanism with noise from the silo's secret
stream, which the authority accounts (`statistics_mechanism`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

# THRESHOLD_DELTA: the probability, for one release of a silo's table, that a category value
# held by one person passes the threshold; public, the authority reserves it per silo.
from clients.protocol.dp_constants import STATISTICS_NOISE_MULTIPLIER, THRESHOLD_DELTA
from clients.protocol.schema import MAX_CATEGORIES, TableSchema, silo_schema
from clients.protocol.tables import SiloDataError, read_table
from clients.silo.text_columns import (
    common_texts,
    noisy_counts,
    not_numeric,
    one_hot_text,
    stored_as_numbers,
    text_cells,
    text_columns,
)
from crypto.at_rest import Keystore
from crypto.identity import IdentifierError, unique_ids
from crypto.secret_random import SecretRandom

log = logging.getLogger(__name__)

TABLE_NAMES = ("features.parquet", "features.parquet.enc", "features.csv")


def find_table(silo_dir: Path) -> Path:
    for name in TABLE_NAMES:
        if (silo_dir / name).exists():
            return silo_dir / name
    raise SiloDataError(
        f"no table in {silo_dir}: expected one of {', '.join(TABLE_NAMES)}; "
        "generate party tables with `fedscore generate --parties DIR`"
    )


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
    text = text_columns(df, expected, schema, where)
    numeric = [c for c in expected if c not in text]
    values = df[numeric].to_numpy(dtype=np.float64)
    inf_cols = [c for c, bad in zip(numeric, np.isinf(values).any(axis=0), strict=True) if bad]
    if inf_cols:
        raise SiloDataError(
            f"{where}: column(s) {', '.join(inf_cols)} hold infinite values; replace them "
            "with real numbers or leave them empty"
        )
    try:
        return unique_ids(df[id_column], schema.id_format)
    except IdentifierError as exc:
        raise SiloDataError(f"{where}: {exc}") from None


# ---- preparation: fixed transforms, declared ranges, noisy statistics ------------------------
# A column's transform and clipping range follow from its declared kind
# (clients/protocol/schema.py), never from the data; what does come from the data (the mean and
# spread that standardise each column, the values of a category column the schema does not list) is
# released once per table through one Gaussian mechanism, accounted by the authority
# (`statistics_mechanism`).

TRANSFORMS: dict[str, str] = {
    "amount": "log1p", "count": "log1p",  # log1p(max(x, 0))
    "rate": "identity", "flag": "identity",
    "signed_log": "signed_log", "real": "signed_log", "auto": "signed_log",  # sign(x) log1p|x|
}
# The range each kind's transformed values are clipped to, unless the schema declares a tighter
# one in the column's own units: log1p 20 is 4.9e8, signed log 25 is 7.2e10.
KIND_RANGES: dict[str, tuple[float, float]] = {
    "amount": (0.0, 20.0), "count": (0.0, 20.0), "rate": (0.0, 1.0), "flag": (0.0, 1.0),
    "signed_log": (-25.0, 25.0), "real": (-25.0, 25.0), "auto": (-25.0, 25.0),
}
# The smallest standard deviation a column is divided by, on the [-1, 1] scale of its range, so
# that a constant column stays finite. The floor also grows with the noise of the variance's
# estimate, so on a table too small for its noise the scale is 1 and the inputs stay in [-2, 2].
MIN_SCALE = 0.05


def _frozen(values: np.ndarray) -> np.ndarray:
    out = np.array(values)
    out.setflags(write=False)
    return out


def statistics_mechanism() -> dict:
    """What fitting a silo's preparation releases, for the authority's ledger.

    One Gaussian mechanism per silo table: per numeric column the sum of u, the sum of u^2 and
    the count of present cells, where u in [-1, 1] is the transformed value clipped to its
    declared range; per category column (numbers or text) whose values the schema does not
    list, the count of each value seen. Adding or removing one person changes each numeric
    column's three numbers by at most 1 each and one count per category column by 1, so the L2
    sensitivity is sqrt(3 numeric + histogram columns), and every number gets N(0, (multiplier *
    sensitivity)^2): account it as `history` (noise multiplier, sample rate 1, 1 step), one
    ledger line per silo. A category value is kept only when its noisy count passes a threshold
    that a value held by one person passes with probability at most `extra_delta` over the
    whole release, which adds to the delta: the authority reserves it for every silo's release
    out of the configured delta and writes it on the release's ledger line (`extra_delta`,
    server/privacy.py). The noise is drawn from the silo's secret stream
    addressed by the table's digest: the same table repeats the same release (no new cost); a
    changed table is a new release."""
    multiplier = STATISTICS_NOISE_MULTIPLIER
    return {
        "mechanism": "gaussian",
        "noise_multiplier": multiplier,
        "sample_rate": 1.0,
        "steps": 1,
        "history": [(multiplier, 1.0, 1)],
        "releases": "one per silo table",
        "sensitivity": "L2, add/remove one person: sqrt(3 * numeric columns + category "
                       "columns without declared values)",
        "extra_delta": THRESHOLD_DELTA,
    }


@dataclass(frozen=True, eq=False)
class StatisticsRelease:
    """What fitting one preparation released: the noisy statistics and their mechanism.
    `noise_multiplier` 0 means exact statistics (rng=None: experiment-layer references only)."""

    noise_multiplier: float  # noise std / sensitivity
    sensitivity: float  # L2, adding or removing one person (one row)
    histogram_columns: tuple[str, ...]  # category columns whose values came from the data
    threshold: float  # the noisy count a category value needed to be kept
    # Per numeric column, noisy: sum of u, sum of u^2, count of present cells.
    sums: np.ndarray
    squares: np.ndarray
    counts: np.ndarray

    @property
    def sigma(self) -> float:
        """The standard deviation of the noise on every released number."""
        return self.noise_multiplier * self.sensitivity

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def extra_delta(self) -> float:
        return THRESHOLD_DELTA if self.private and self.histogram_columns else 0.0


@dataclass(frozen=True, eq=False)
class Preparation:
    """How a silo turns its table into model inputs, fitted once on the training table and
    applied unchanged to other rows (a later cohort, new applicants), so that a shift in the
    data shows up in the inputs instead of being standardised away.

    Numeric columns: a transform fixed by the column's kind (`TRANSFORMS`), clipped to the
    kind's range or the schema's declared one (`KIND_RANGES`, so one extreme value moves
    nothing beyond its clip) and mapped linearly to u in [-1, 1]; a missing cell takes the
    fitted mean, then (u - mean) / scale. Every numeric column has a `__missing` indicator
    column, whether or not the training table had missing cells (that too would be a private
    fact). Category columns of numbers: one 0/1 column per value (declared in the schema, else
    kept by the noisy count), then `=missing`; a value not among them gives an all-zero row: the
    person is like no group the model knows, which is neutral for its first layer. Text category
    columns (`texts`, after them): one 0/1 column per kept value (`col='value'`), then
    `=other` for every value not kept (rare, unseen, or beyond `MAX_CATEGORIES`), then
    `=missing`; only kept values (declared, or past the noisy threshold) name a column.
    """

    silo: str
    numeric: tuple[str, ...]
    transforms: tuple[str, ...]  # per numeric column: "log1p", "identity" or "signed_log"
    low: np.ndarray  # per numeric column, the clipping range after the transform
    high: np.ndarray
    mean: np.ndarray  # on the u scale; also the fill for missing cells
    scale: np.ndarray  # the standard deviation on the u scale, at least MIN_SCALE
    categories: tuple[tuple[str, tuple[float, ...]], ...]  # (column, values in sorted order)
    columns: tuple[str, ...]  # names of the model inputs, in order
    release: StatisticsRelease
    texts: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, kept values, sorted)

    @classmethod
    def fit(cls, df: pd.DataFrame, silo: str, expected: list[str],
            schema: TableSchema | None = None, *,
            rng: np.random.Generator | None) -> Preparation:
        """Fit on `df` (already validated, e.g. by `validate`) with noisy statistics drawn from
        `rng`, which must be the silo's secret stream (`load_silo` makes it). `rng=None` uses
        exact statistics, which are NOT private: only for experiment-layer references
        (simulations/ baselines, tests) that never release a model."""
        schema = schema or TableSchema()
        where = f"silo {silo!r}"
        text = text_columns(df, expected, schema, where)
        categorical = [c for c in expected if schema.kind(c) == "category" or c in text]
        numeric = [c for c in expected if c not in categorical]
        raw = df[numeric].to_numpy(dtype=np.float64, copy=True)
        nan = np.isnan(raw)
        if numeric and nan.all(axis=0).any():
            empty = [c for c, e in zip(numeric, nan.all(axis=0), strict=True) if e]
            raise SiloDataError(
                f"{where}: column(s) {', '.join(empty)} are entirely empty; drop them "
                "from the table and the schema, or fill them"
            )
        transforms = tuple(TRANSFORMS[schema.kind(c)] for c in numeric)
        low, high = _ranges(numeric, transforms, schema, where)
        u = _to_unit(raw, transforms, low, high)
        present = ~nan
        u[nan] = 0.0
        u.sort(axis=0)  # sums independent of the row order, to the last bit
        exact = np.stack([u.sum(axis=0), (u * u).sum(axis=0), present.sum(axis=0)])
        histogram = [c for c in categorical if schema.declared_categories(c) is None]
        multiplier = 0.0 if rng is None else STATISTICS_NOISE_MULTIPLIER
        sensitivity = math.sqrt(3 * len(numeric) + len(histogram))
        sigma = multiplier * sensitivity
        # Draw order (a known answer for tests): sums, squares, counts, each over the numeric
        # columns; then each histogram column's counts in schema order, values ascending (text
        # by code point).
        noisy = exact if rng is None else exact + sigma * rng.standard_normal(exact.shape)
        threshold = 0.0
        if rng is not None and histogram:
            z = -NormalDist().inv_cdf(THRESHOLD_DELTA / len(histogram))
            threshold = 1.0 + sigma * z
        categories, texts = [], []
        for col in categorical:
            declared = schema.declared_categories(col)
            if declared is not None and (col in text) != isinstance(declared[0], str):
                held, listed = ("text", "numbers") if col in text else ("numbers", "texts")
                raise SiloDataError(f"{where}: column {col!r} holds {held} but its declared "
                                    f"categories are {listed}; declare its values as {held}")
            if col in text:
                kept = (tuple(sorted({str(v).strip() for v in declared})) if declared is not None
                        else common_texts(text_cells(df[col]), col, rng, sigma, threshold))
                texts.append((col, kept))
                continue
            if declared is not None:
                values = np.unique(np.asarray(declared, dtype=np.float64))
            else:
                values = _common_values(df[col].to_numpy(dtype=np.float64), col, rng, sigma,
                                        threshold)
            categories.append((col, tuple(float(v) for v in values)))
        n = np.maximum(noisy[2], 1.0)
        mean = np.clip(noisy[0] / n, -1.0, 1.0)
        second = np.clip(noisy[1] / n, 0.0, 1.0)
        # The variance is never taken below the noise of its own estimate (sigma / n on each
        # moment, the mean's twice over through mean^2): noise may then shrink a column's
        # inputs, but seldom blow them up more than twofold (which destabilises training).
        floor = np.maximum(MIN_SCALE**2, sigma / n * np.sqrt(1.0 + 4.0 * mean * mean))
        scale = np.sqrt(np.clip(second - mean * mean, np.minimum(floor, 1.0), 1.0))
        names = [*numeric, *(f"{c}__missing" for c in numeric)]
        for col, levels in categories:
            names += [f"{col}={v:g}" for v in levels] + [f"{col}=missing"]
        for col, kept in texts:
            names += [f"{col}={v!r}" for v in kept] + [f"{col}=other", f"{col}=missing"]
        release = StatisticsRelease(multiplier, sensitivity, tuple(histogram), threshold,
                                    _frozen(noisy[0]), _frozen(noisy[1]), _frozen(noisy[2]))
        return cls(silo, tuple(numeric), transforms, _frozen(low), _frozen(high), _frozen(mean),
                   _frozen(scale), tuple(categories), tuple(names), release, tuple(texts))

    @property
    def features(self) -> tuple[str, ...]:
        """The table columns this preparation reads."""
        return (*self.numeric, *(c for c, _ in self.categories), *(c for c, _ in self.texts))

    @property
    def fill(self) -> np.ndarray:
        """What a missing numeric cell becomes, on the u scale: the fitted (noisy) mean."""
        return self.mean

    @property
    def indicators(self) -> tuple[str, ...]:
        """Numeric columns with a missing-value indicator: all of them."""
        return self.numeric

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Model inputs (float32, one row per row of `df`, `columns` in order) with the fitted
        statistics; on the table it was fitted on, exactly what `prepare` returns."""
        where = f"silo {self.silo!r}"
        absent = [c for c in self.features if c not in df.columns]
        if absent:
            raise SiloDataError(f"{where}: missing column(s) {', '.join(absent)}; add them "
                                "(empty values are allowed) or fix the column names")
        text = {c for c, _ in self.texts}
        for col in self.features:
            if col not in text and not stored_as_numbers(df[col]):
                raise SiloDataError(f"{where}: column {col!r} is "
                                    f"{not_numeric(col, None, df[col])}")
        raw = df[list(self.numeric)].to_numpy(dtype=np.float64, copy=True)
        if np.isinf(raw).any():
            raise SiloDataError(f"{where}: infinite values; replace them with real numbers or "
                                "leave them empty")
        nan = np.isnan(raw)
        # `raw` is this call's own copy (copy=True), so every step works in place: a
        # million-row table costs one float64 copy and the float32 result, not five copies.
        x = _to_unit(raw, self.transforms, self.low, self.high)
        np.copyto(x, np.broadcast_to(self.mean, x.shape), where=nan)
        x -= self.mean
        x /= self.scale
        d = x.shape[1]
        widths = [len(v) + 1 for _, v in self.categories]
        text_widths = [len(v) + 2 for _, v in self.texts]
        out = np.empty((len(x), 2 * d + sum(widths) + sum(text_widths)), dtype=np.float32)
        out[:, :d] = x
        out[:, d : 2 * d] = nan
        start = 2 * d
        for (col, values), width in zip(self.categories, widths, strict=True):
            out[:, start : start + width] = _one_hot(df[col].to_numpy(dtype=np.float64), values)
            start += width
        for (col, kept), width in zip(self.texts, text_widths, strict=True):
            out[:, start : start + width] = one_hot_text(text_cells(df[col]), kept)
            start += width
        return out


def _ranges(numeric: list[str], transforms: tuple[str, ...], schema: TableSchema,
            where: str) -> tuple[np.ndarray, np.ndarray]:
    """Per numeric column the clipping range after its transform: the schema's declared range
    (in the column's units, transformed) or its kind's default."""
    low, high = np.zeros(len(numeric)), np.ones(len(numeric))
    for j, (col, how) in enumerate(zip(numeric, transforms, strict=True)):
        declared = schema.range(col)
        if declared is None:
            low[j], high[j] = KIND_RANGES[schema.kind(col)]
            continue
        ends = _apply(np.array([declared], dtype=np.float64), (how, how))[0]
        if not ends[0] < ends[1]:
            raise SiloDataError(f"{where}: the declared range {list(declared)} of {col!r} is "
                                f"empty once transformed ({how}: negative values count as 0); "
                                "declare a range with a positive upper end")
        low[j], high[j] = ends
    return low, high


def _apply(x: np.ndarray, transforms: tuple[str, ...]) -> np.ndarray:
    """The columns' transforms, in place (NaN stays NaN)."""
    how = np.asarray(transforms)
    logged, signed = how == "log1p", how == "signed_log"
    if logged.any():
        x[:, logged] = np.log1p(np.maximum(x[:, logged], 0.0))
    if signed.any():
        x[:, signed] = np.sign(x[:, signed]) * np.log1p(np.abs(x[:, signed]))
    return x


def _to_unit(raw: np.ndarray, transforms: tuple[str, ...], low: np.ndarray,
             high: np.ndarray) -> np.ndarray:
    """u in [-1, 1]: transformed, clipped to [low, high] and mapped linearly; in place on `raw`
    (NaN stays NaN)."""
    x = _apply(raw, transforms)
    np.clip(x, low, high, out=x)
    x -= (low + high) / 2
    x /= (high - low) / 2
    return x


def _common_values(values: np.ndarray, col: str, rng: np.random.Generator | None, sigma: float,
                   threshold: float) -> np.ndarray:
    """The values of an undeclared category column: those whose count plus N(0, sigma^2)
    passes `threshold` (with rng=None, every value seen: exact, not private)."""
    seen, counts = np.unique(values[~np.isnan(values)], return_counts=True)
    seen = seen[noisy_counts(counts, rng, sigma) > threshold]
    if len(seen) > MAX_CATEGORIES:
        raise SiloDataError(
            f"column {col!r} is declared a category but has {len(seen)} "
            f"{'common ' if rng is not None else ''}distinct values (more than "
            f"{MAX_CATEGORIES}); declare it auto")
    return seen


def _one_hot(values: np.ndarray, categories: tuple[float, ...]) -> np.ndarray:
    """One 0/1 column per fitted value, then `=missing`; a value not among them: all zero."""
    known = np.asarray(categories, dtype=np.float64)
    width = len(known) + 1
    out = np.zeros((len(values), width))
    pos = np.searchsorted(known, values)
    found = (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == values) \
        if len(known) else np.zeros(len(values), dtype=bool)
    column = np.where(found, pos, -1)
    column = np.where(np.isnan(values), width - 1, column)
    rows = np.flatnonzero(column >= 0)
    out[rows, column[rows]] = 1.0
    return out


def table_digest(df: pd.DataFrame) -> str:
    """SHA-256 of a table's content, whatever its row or column order and however it is stored
    (plain or encrypted): it addresses the secret stream of the table's noisy statistics, so the
    same table always gives the same preparation."""
    columns = sorted(str(c) for c in df.columns)
    frame = df.set_axis([str(c) for c in df.columns], axis=1)[columns]
    rows = np.sort(pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64))
    h = hashlib.sha256(json.dumps(columns).encode())
    h.update(rows.tobytes())
    return h.hexdigest()


@dataclass
class SiloMatrix:
    """Model-ready features of one silo, row i = table row i."""

    x: np.ndarray  # float32 (n, d)
    columns: list[str]  # names of x's columns, indicators after the numeric columns
    ids: pd.Series  # normalised identifiers, E.164; never leaves the silo
    # The fitted preparation, to turn other rows (a later cohort) into inputs the same way.
    prep: Preparation | None = None


def prepare(df: pd.DataFrame, silo: str, expected: list[str],
            schema: TableSchema | None = None, *,
            rng: np.random.Generator | None) -> SiloMatrix:
    """Validate, fit a `Preparation` on the table and apply it: each column transformed by its
    kind, clipped to its declared range, standardised with noisy statistics drawn from `rng`
    (the silo's secret stream), with a missing indicator per numeric column; `category` columns
    become one-hot columns instead. `rng=None`: exact statistics, not private, for
    experiment-layer references only (see `Preparation.fit`)."""
    schema = schema or TableSchema()
    ids = validate(df, silo, expected, schema)
    prep = Preparation.fit(df, silo, expected, schema, rng=rng)
    matrix = prep.transform(df)
    log.debug("silo %s: %d rows, %d model inputs", silo, len(matrix), matrix.shape[1])
    return SiloMatrix(x=matrix, columns=list(prep.columns), ids=ids, prep=prep)


def load_silo(silo_dir: Path, silo: str, store: Keystore | None = None) -> SiloMatrix:
    """The silo's table, validated against its schema (schema.json, or the generated layout)
    and prepared with noisy statistics (`statistics_mechanism`). The noise comes from the
    silo's secret (in its keystore, or in `silo_dir` without one) on a stream addressed by the
    table's digest: the same table always gives the same preparation, and nobody without the
    secret can predict or remove the noise."""
    try:
        schema = silo_schema(silo_dir, silo)
    except ValueError as exc:
        raise SiloDataError(f"silo {silo!r}: {exc}") from None
    table = read_table(find_table(silo_dir), silo, store, schema.id_column,
                       schema.declared_text())
    random = SecretRandom.load_or_create(store.path if store is not None else Path(silo_dir),
                                         silo)
    rng = random.generator("statistics", table_digest(table))
    return prepare(table, silo, list(schema.features), schema, rng=rng)
