"""A silo's table: bad tables stop with a message naming the problem; missing values are fine."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clients.schema import TableSchema, feature_names
from clients.silo_data import SiloDataError, prepare

SILO = "device"
COLS = feature_names(SILO)


def table(n: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.random((n, len(COLS))) * 10, columns=COLS)
    df.insert(0, "phone", [f"138 {i:04d} {i:04d}" for i in range(n)])
    return df


def test_a_good_table_becomes_a_standardised_matrix():
    m = prepare(table(), SILO, COLS)
    assert m.x.dtype == np.float32
    assert m.x.shape == (50, len(COLS))
    assert np.allclose(m.x.mean(axis=0), 0, atol=1e-5)
    assert m.ids.iloc[0] == "+8613800000000"


def test_missing_values_are_imputed_with_indicator_columns():
    df = table()
    df.loc[[3, 7], COLS[2]] = np.nan
    m = prepare(df, SILO, COLS)
    assert m.columns[-1] == f"{COLS[2]}__missing"
    assert np.isfinite(m.x).all()
    flags = m.x[:, -1]
    assert flags[3] == flags[7] == 1
    assert flags.sum() == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.drop(columns=[COLS[1]]), f"missing column.*{COLS[1]}.*add them"),
        (lambda df: df.assign(shoe_size=1.0), "unexpected column.*shoe_size.*drop them"),
        (lambda df: df.rename(columns={"phone": "mobile"}), "identifier column 'phone'"),
        (lambda df: df.assign(**{COLS[0]: "high"}), f"{COLS[0]}.*not numeric"),
        (lambda df: df.assign(**{COLS[3]: np.inf}), f"{COLS[3]}.*infinite"),
        (lambda df: df.assign(**{COLS[4]: np.nan}), f"{COLS[4]}.*entirely empty"),
        (lambda df: df.iloc[:0], "no rows"),
    ],
)
def test_bad_tables_are_refused_with_a_fix(mutate, message):
    with pytest.raises(SiloDataError, match=message):
        prepare(mutate(table()), SILO, COLS)


def test_duplicate_identifiers_are_found_after_normalisation_without_echoing_them():
    df = table()
    df.loc[1, "phone"] = "+86 138 0000 0000"  # same person as row 0, written differently
    with pytest.raises(SiloDataError, match="1 identifiers appear more than once") as err:
        prepare(df, SILO, COLS)
    assert "138" not in str(err.value)


def test_column_kinds_one_hot_categories_and_sign_log_amounts():
    df = pd.DataFrame({
        "id": ["a", "b", "c", "d"],
        "status": [-1.0, 0.0, 2.0, np.nan],
        "bill": [-5000.0, 10.0, 300000.0, 0.0],
    })
    schema = TableSchema("id", "plain", ("status", "bill"),
                         kinds=(("bill", "signed_log"), ("status", "category")))
    m = prepare(df, "s", ["status", "bill"], schema)
    assert m.columns == ["bill", "status=-1", "status=0", "status=2", "status=missing"]
    np.testing.assert_array_equal(m.x[:, 1:], np.eye(4))
    logged = np.sign(df["bill"]) * np.log1p(df["bill"].abs())
    expected = (logged - logged.mean()) / logged.std(ddof=0)
    np.testing.assert_allclose(m.x[:, 0], expected, rtol=1e-5)


def test_unknown_kind_and_a_category_with_too_many_values_are_refused():
    with pytest.raises(ValueError, match="choose one of auto, signed_log, category"):
        TableSchema(kinds=(("x", "ordinal"),))
    df = pd.DataFrame({"id": [str(i) for i in range(100)], "x": np.arange(100.0)})
    schema = TableSchema("id", "plain", ("x",), kinds=(("x", "category"),))
    with pytest.raises(SiloDataError, match="declare it auto"):
        prepare(df, "s", ["x"], schema)
