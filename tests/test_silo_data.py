"""A silo's table: bad tables stop with a message naming the problem; missing values are fine."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- the fitted preparation ----------------------------------------------------------------------
# `_reference_prepare` is prepare() as it was before it became fit + transform (commit f861cb4),
# kept verbatim so the refactor is checked for bit-identical output.


def _reference_prepare(df, silo, expected, schema=None):
    schema = schema or TableSchema()
    categorical = [c for c in expected if schema.kind(c) == "category"]
    numeric = [c for c in expected if c not in categorical]
    x, columns = _reference_numeric(df, silo, numeric, schema)
    blocks, names = [x], [columns]
    for col in categorical:
        block, block_names = _reference_one_hot(df[col], col)
        blocks.append(block)
        names.append(block_names)
    return np.hstack(blocks).astype(np.float32), [c for group in names for c in group]


def _reference_one_hot(values, col):
    codes, uniques = pd.factorize(values, sort=True, use_na_sentinel=True)
    width = len(uniques) + int((codes < 0).any())
    out = np.zeros((len(codes), width))
    out[np.arange(len(codes)), np.where(codes < 0, width - 1, codes)] = 1.0
    names = [f"{col}={v:g}" for v in uniques] + ([f"{col}=missing"] if width > len(uniques)
                                                 else [])
    return out, names


def _reference_numeric(df, silo, expected, schema):
    if not expected:
        return np.zeros((len(df), 0)), []
    raw = df[expected].to_numpy(dtype=np.float64)
    nan = np.isnan(raw)
    x = raw.copy()
    nonneg = np.nanmin(x, axis=0) >= 0
    mean, std = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
    median = np.nanmedian(x, axis=0)
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


def _assert_same_as_reference(df, silo, expected, schema=None):
    m = prepare(df, silo, expected, schema)
    x, columns = _reference_prepare(df, silo, expected, schema)
    assert m.columns == columns
    assert m.x.dtype == x.dtype
    np.testing.assert_array_equal(m.x, x)  # bit for bit (NaN never occurs)
    assert np.array_equal(m.x.view(np.uint32), x.view(np.uint32))
    np.testing.assert_array_equal(m.prep.transform(df), m.x)
    return m


def test_prepare_is_bit_identical_to_before_on_generated_tables():
    from simulations.population import PopulationConfig, generate

    pop = generate(PopulationConfig(users=2000, seed=4, missing_rate=0.1))
    for silo, tbl in pop.silos.items():
        m = _assert_same_as_reference(tbl, silo, feature_names(silo))
        assert any(c.endswith("__missing") for c in m.columns)


CATEGORY_SCHEMA = TableSchema("id", "plain", ("pay", "bill", "age", "sex"),
                              kinds=(("bill", "signed_log"), ("pay", "category"),
                                     ("sex", "category")))


def _uci_like(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "id": [f"C{i}" for i in range(n)],
        "pay": rng.integers(-2, 9, n).astype(np.float64),
        "bill": np.round(rng.lognormal(8, 2, n) * rng.choice([-1, 1], n, p=[0.1, 0.9])),
        "age": rng.integers(21, 80, n).astype(np.float64),
        "sex": rng.integers(1, 3, n).astype(np.float64),
    })
    df.loc[rng.random(n) < 0.05, "pay"] = np.nan
    df.loc[rng.random(n) < 0.05, "bill"] = np.nan
    return df


def test_prepare_is_bit_identical_to_before_with_categories_and_signed_logs():
    m = _assert_same_as_reference(_uci_like(3000, 1), "payments", list(CATEGORY_SCHEMA.features),
                                  CATEGORY_SCHEMA)
    assert "pay=missing" in m.columns
    assert "bill__missing" in m.columns


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(2, 40))
def test_prepare_matches_the_reference_on_arbitrary_tables(data, n):
    finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    cell = st.one_of(finite, st.just(np.nan), st.integers(0, 1000).map(float))
    cols = {name: data.draw(st.lists(cell, min_size=n, max_size=n), label=name)
            for name in ("a", "b", "c")}
    cols["k"] = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, -3.0, np.nan]),
                                   min_size=n, max_size=n), label="k")
    df = pd.DataFrame({"id": [str(i) for i in range(n)], **cols})
    for name in ("a", "b", "c"):  # a column entirely empty is refused by design
        if df[name].isna().all():
            df.loc[0, name] = 1.0
    schema = TableSchema("id", "plain", ("a", "b", "c", "k"),
                         kinds=(("b", "signed_log"), ("k", "category")))
    _assert_same_as_reference(df, "s", ["a", "b", "c", "k"], schema)


def test_new_rows_use_the_fitted_statistics():
    train = _uci_like(2000, 2)
    m = prepare(train, "payments", list(CATEGORY_SCHEMA.features), CATEGORY_SCHEMA)
    prep = m.prep
    new = _uci_like(500, 3)
    new["age"] += 10.0  # everyone ten years older: the shift must survive the preparation
    x = prep.transform(new)
    age = m.columns.index("age")
    assert x[:, age].mean() > 0.5  # about 10 / sd(age) = 0.6 standard deviations
    assert abs(m.x[:, age].mean()) < 1e-5
    assert x.shape == (500, len(m.columns))
    assert x.dtype == np.float32
    # Rows of the training table transform to exactly their training inputs.
    np.testing.assert_array_equal(prep.transform(train.iloc[[5, 0, 9]]), m.x[[5, 0, 9]])


def test_new_rows_unseen_categories_empty_columns_and_new_missing_cells():
    train = _uci_like(1000, 4)
    train["age"] = train["age"].astype(np.float64)
    m = prepare(train, "payments", list(CATEGORY_SCHEMA.features), CATEGORY_SCHEMA)
    prep = m.prep
    assert "age__missing" not in m.columns
    assert "sex=missing" not in m.columns
    new = train.iloc[:4].copy()
    new["pay"] = [42.0, np.nan, 0.0, -2.0]  # 42 never seen; NaN has a fitted column
    new["sex"] = [7.0, np.nan, 1.0, 2.0]  # 7 never seen; no fitted missing column
    new["bill"] = np.nan  # entirely empty in the new rows: imputed, no error
    new["age"] = [np.nan, 30.0, np.nan, 40.0]  # missing where there was no indicator
    x = prep.transform(new)
    cols = m.columns
    pay = [i for i, c in enumerate(cols) if c.startswith("pay=")]
    sex = [i for i, c in enumerate(cols) if c.startswith("sex=")]
    assert x[0, pay].sum() == 0  # unseen value: all zero
    assert x[1, cols.index("pay=missing")] == 1
    assert x[1, pay].sum() == 1
    assert x[2, cols.index("pay=0")] == 1
    assert x[0, sex].sum() == 0
    assert x[1, sex].sum() == 0
    assert x[3, cols.index("sex=2")] == 1
    bill, b = cols.index("bill"), prep.numeric.index("bill")
    np.testing.assert_allclose(x[:, bill], (prep.median[b] - prep.mean[b]) / prep.scale[b],
                               rtol=1e-6)
    assert (x[:, cols.index("bill__missing")] == 1).all()
    age, a = cols.index("age"), prep.numeric.index("age")
    np.testing.assert_allclose(x[[0, 2], age], (prep.median[a] - prep.mean[a]) / prep.scale[a],
                               rtol=1e-6)
    assert np.isfinite(x).all()


def test_new_negative_values_in_a_log_column_are_clipped():
    df = table(200)
    df["password_age_days"] = np.random.default_rng(1).lognormal(4, 1.5, 200)
    m = prepare(df, SILO, COLS)
    col = COLS.index("password_age_days")
    assert m.prep.skewed[col]
    new = df.iloc[:2].copy()
    new["password_age_days"] = [-5.0, 0.0]
    x = m.prep.transform(new)
    assert np.isfinite(x).all()
    assert x[0, col] == x[1, col]


def test_preparation_is_immutable_and_checks_new_tables():
    m = prepare(table(), SILO, COLS)
    with pytest.raises(ValueError, match="read-only"):
        m.prep.mean[0] = 1.0
    with pytest.raises(SiloDataError, match=f"missing column.*{COLS[0]}"):
        m.prep.transform(table().drop(columns=COLS[0]))
    with pytest.raises(SiloDataError, match="not numeric"):
        m.prep.transform(table().assign(**{COLS[1]: "x"}))
    with pytest.raises(SiloDataError, match="infinite"):
        m.prep.transform(table().assign(**{COLS[1]: np.inf}))
