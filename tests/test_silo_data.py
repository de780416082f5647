"""A silo's table: bad tables stop with a message naming the problem; missing values are fine."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clients.schema import feature_names
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
