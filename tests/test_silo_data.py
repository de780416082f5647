"""A silo's table: bad tables stop with a message naming the problem; missing values are fine;
the preparation uses no exact statistic of the table, only declared kinds and ranges and one
accounted Gaussian release drawn from the silo's secret stream."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.protocol.accounting import STATISTICS_NOISE_MULTIPLIER
from clients.protocol.schema import (
    MAX_CATEGORIES,
    SCHEMA_FILE,
    TableSchema,
    feature_names,
    silo_schema,
)
from clients.protocol.tables import SiloDataError, read_table
from clients.silo.data import (
    MIN_SCALE,
    THRESHOLD_DELTA,
    load_silo,
    prepare,
    statistics_mechanism,
    table_digest,
)
from clients.silo.text_columns import common_texts, text_cells
from crypto.secret_random import SECRET_FILE

SILO = "device"
COLS = feature_names(SILO)
SCHEMA = TableSchema(features=tuple(COLS))  # every column "auto": signed log in [-25, 25]


def table(n: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.random((n, len(COLS))) * 10, columns=COLS)
    df.insert(0, "phone", [f"138 {i:04d} {i:04d}" for i in range(n)])
    return df


def noise(seed: int = 0) -> np.random.Generator:
    """A fixed stand-in for the silo's secret stream."""
    return np.random.default_rng(seed)


def test_a_good_table_becomes_a_standardised_matrix():
    m = prepare(table(), SILO, COLS, rng=None)  # exact: an experiment-layer reference
    assert m.x.dtype == np.float32
    assert m.columns == [*COLS, *(f"{c}__missing" for c in COLS)]
    assert m.x.shape == (50, 2 * len(COLS))
    assert np.allclose(m.x[:, : len(COLS)].mean(axis=0), 0, atol=1e-5)
    assert (m.x[:, len(COLS):] == 0).all()
    assert m.ids.iloc[0] == "+8613800000000"
    assert not m.prep.release.private


def test_missing_values_are_imputed_with_indicator_columns():
    df = table()
    df.loc[[3, 7], COLS[2]] = np.nan
    m = prepare(df, SILO, COLS, rng=noise())
    assert m.columns[len(COLS) + 2] == f"{COLS[2]}__missing"
    assert np.isfinite(m.x).all()
    flags = m.x[:, len(COLS) + 2]
    assert flags[3] == flags[7] == 1
    assert flags.sum() == 2
    # A missing cell takes the fitted (noisy) mean: 0 once standardised.
    assert m.x[3, 2] == m.x[7, 2] == 0


def test_every_numeric_column_has_an_indicator_whatever_the_data():
    schema = TableSchema("id", "plain", ("a", "b", "k"), kinds=(("k", "category"),))
    full = pd.DataFrame({"id": ["1", "2", "3"], "a": [1.0, 2.0, 3.0], "b": [0.0, 0.0, 0.0],
                         "k": [1.0, 2.0, 1.0]})
    holes = full.assign(a=[np.nan, 2.0, 3.0], k=[np.nan, 2.0, 1.0])
    names = [prepare(df, "s", ["a", "b", "k"], schema, rng=rng).columns
             for df in (full, holes) for rng in (None, noise())]
    assert all("a__missing" in n and "b__missing" in n and "k=missing" in n for n in names)
    assert names[0] == names[2]
    assert names[1] == names[3]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.drop(columns=[COLS[1]]), f"missing column.*{COLS[1]}.*add them"),
        (lambda df: df.assign(shoe_size=1.0), "unexpected column.*shoe_size.*drop them"),
        (lambda df: df.rename(columns={"phone": "mobile"}), "identifier column 'phone'"),
        # A few words in a column of numbers: a mistake to fix (all words: a text category).
        (lambda df: df.assign(**{COLS[0]: ["high"] * 5 + [*df[COLS[0]][5:]]}),
         f"{COLS[0]}.*not numeric: 5 of 50 cells are text among 45 numbers"),
        (lambda df: df.assign(**{COLS[3]: np.inf}), f"{COLS[3]}.*infinite"),
        (lambda df: df.assign(**{COLS[4]: np.nan}), f"{COLS[4]}.*entirely empty"),
        (lambda df: df.iloc[:0], "no rows"),
    ],
)
def test_bad_tables_are_refused_with_a_fix(mutate, message):
    with pytest.raises(SiloDataError, match=message):
        prepare(mutate(table()), SILO, COLS, rng=noise())


def test_duplicate_identifiers_are_found_after_normalisation_without_echoing_them():
    df = table()
    df.loc[1, "phone"] = "+86 138 0000 0000"  # same person as row 0, written differently
    with pytest.raises(SiloDataError, match="1 identifiers appear more than once") as err:
        prepare(df, SILO, COLS, rng=noise())
    assert "138" not in str(err.value)


def test_column_kinds_one_hot_categories_and_sign_log_amounts():
    df = pd.DataFrame({
        "id": ["a", "b", "c", "d"],
        "status": [-1.0, 0.0, 2.0, np.nan],
        "bill": [-5000.0, 10.0, 300000.0, 0.0],
    })
    schema = TableSchema("id", "plain", ("status", "bill"),
                         kinds=(("bill", "signed_log"), ("status", "category")))
    m = prepare(df, "s", ["status", "bill"], schema, rng=None)
    assert m.columns == ["bill", "bill__missing", "status=-1", "status=0", "status=2",
                         "status=missing"]
    np.testing.assert_array_equal(m.x[:, 2:], np.eye(4))
    u = np.sign(df["bill"]) * np.log1p(df["bill"].abs()) / 25
    expected = (u - u.mean()) / u.std(ddof=0)
    np.testing.assert_allclose(m.x[:, 0], expected, rtol=1e-5)


@pytest.mark.parametrize(("kind", "values", "units"), [
    # log1p(max(x, 0)) in [0, 20]
    ("amount", [-5.0, 0.0, math.expm1(10.0), math.expm1(20.0), 1e12], [-1, -1, 0, 1, 1]),
    ("count", [0.0, math.expm1(5.0), 3.0], [-1, -0.5, 2 * math.log1p(3.0) / 20 - 1]),
    # identity in [0, 1]
    ("rate", [0.0, 0.25, 1.0, 7.0, -3.0], [-1, -0.5, 1, 1, -1]),
    ("flag", [0.0, 1.0], [-1, 1]),
    # sign(x) log1p |x| in [-25, 25]
    ("signed_log", [-math.expm1(25.0), 0.0, math.expm1(12.5), -1e300], [-1, 0, 0.5, -1]),
    ("real", [math.expm1(5.0)], [0.2]),
    ("auto", [-math.expm1(5.0)], [-0.2]),
])
def test_each_kind_has_a_fixed_transform_and_range(kind, values, units):
    schema = TableSchema("id", "plain", ("x",), kinds=((("x", kind),) if kind != "auto" else ()))
    df = pd.DataFrame({"id": [str(i) for i in range(len(values))], "x": values})
    prep = prepare(df, "s", ["x"], schema, rng=noise()).prep
    x = prep.transform(df)[:, 0].astype(np.float64)
    np.testing.assert_allclose(x * prep.scale[0] + prep.mean[0], units, atol=1e-6)


def test_a_declared_range_replaces_the_kinds_default():
    schema = TableSchema("id", "plain", ("age", "spend"), kinds=(("spend", "amount"),),
                         ranges=(("age", (18.0, 100.0)), ("spend", (0.0, 1e6))))
    df = pd.DataFrame({"id": ["1", "2", "3"], "age": [18.0, 60.0, 150.0],
                       "spend": [0.0, 1e6, 5e7]})
    prep = prepare(df, "s", ["age", "spend"], schema, rng=None).prep
    np.testing.assert_allclose(prep.low, [math.log1p(18), 0.0])
    np.testing.assert_allclose(prep.high, [math.log1p(100), math.log1p(1e6)])
    bad = TableSchema("id", "plain", ("age", "spend"), kinds=(("spend", "amount"),),
                      ranges=(("spend", (-10.0, -1.0)),))
    with pytest.raises(SiloDataError, match=r"declared range .* of 'spend' is empty"):
        prepare(df, "s", ["age", "spend"], bad, rng=None)


def test_unknown_kind_bad_declarations_and_a_category_with_too_many_values_are_refused():
    with pytest.raises(ValueError, match="choose one of auto, signed_log, category, amount"):
        TableSchema(kinds=(("x", "ordinal"),))
    with pytest.raises(ValueError, match="low < high"):
        TableSchema(features=("x",), ranges=(("x", (5.0, 1.0)),))
    with pytest.raises(ValueError, match="declare its kind category"):
        TableSchema(features=("x",), categories=(("x", (1.0, 2.0)),))
    with pytest.raises(ValueError, match="distinct numbers"):
        TableSchema(features=("x",), kinds=(("x", "category"),), categories=(("x", (1, 1)),))
    with pytest.raises(ValueError, match="name 'y', not among the features"):
        TableSchema(features=("x",), ranges=(("y", (0.0, 1.0)),))
    df = pd.DataFrame({"id": [str(i) for i in range(100)], "x": np.arange(100.0)})
    schema = TableSchema("id", "plain", ("x",), kinds=(("x", "category"),))
    with pytest.raises(SiloDataError, match="declare it auto"):
        prepare(df, "s", ["x"], schema, rng=None)
    # With noise, values held by one person each are not kept: nothing to refuse.
    assert prepare(df, "s", ["x"], schema, rng=noise()).columns == ["x=missing"]
    many = pd.DataFrame({"id": [str(i) for i in range(200_000)],
                         "x": np.arange(200_000.0) % 70})
    with pytest.raises(SiloDataError, match=r"70 common distinct values.*declare it auto"):
        prepare(many, "s", ["x"], schema, rng=noise())


def test_schema_json_declares_kinds_ranges_and_categories(tmp_path: Path):
    (tmp_path / SCHEMA_FILE).write_text(
        '{"id_column": "id", "id_kind": "plain", "features": ["age", "sex"],'
        ' "kinds": {"sex": "category"}, "ranges": {"age": [18, 100]},'
        ' "categories": {"sex": [2, 1]}}')
    schema = silo_schema(tmp_path, "s")
    assert schema.range("age") == (18, 100)
    assert schema.declared_categories("sex") == (2, 1)
    df = pd.DataFrame({"id": ["1", "2", "3"], "age": [20.0, 30.0, np.nan],
                       "sex": [1.0, 3.0, 2.0]})
    m = prepare(df, "s", ["age", "sex"], schema, rng=noise())
    # Declared values, whatever the data holds (3 is not declared: an all-zero row).
    assert m.columns == ["age", "age__missing", "sex=1", "sex=2", "sex=missing"]
    np.testing.assert_array_equal(m.x[:, 2:], [[1, 0, 0], [0, 0, 0], [0, 1, 0]])
    assert m.prep.release.histogram_columns == ()
    assert m.prep.release.sensitivity == pytest.approx(math.sqrt(3))
    (tmp_path / SCHEMA_FILE).write_text('{"features": ["age"], "ranges": {"age": 5}}')
    with pytest.raises(ValueError, match="two finite numbers"):
        silo_schema(tmp_path, "s")


def test_the_generated_layout_declares_each_features_kind():
    schema = silo_schema(Path("/nonexistent"), "social")
    assert schema.kind("interaction_freq") == "amount"
    assert schema.kind("group_activity") == "rate"
    assert schema.kind("contacts_avg_standing") == "real"
    assert schema.range("contacts_avg_standing") == (300.0, 850.0)
    with pytest.raises(ValueError, match="unknown silo"):
        silo_schema(Path("/nonexistent"), "bank")


# ---- the noisy release -------------------------------------------------------------------------

def _exact_statistics(df: pd.DataFrame, silo: str, expected: list[str],
                      schema: TableSchema) -> np.ndarray:
    """(3, d): sums of u, of u^2 and counts of present cells, from the exact fit."""
    r = prepare(df, silo, expected, schema, rng=None).prep.release
    return np.stack([r.sums, r.squares, r.counts])


def test_the_noise_is_the_declared_multiplier_times_the_sensitivity_known_answer():
    df = table(200)
    df.loc[[1, 2], COLS[0]] = np.nan
    schema = TableSchema(features=(*COLS, "k"), kinds=(("k", "category"),))
    df["k"] = np.where(np.arange(200) % 2, 1.0, 2.0)
    prep = prepare(df, SILO, [*COLS, "k"], schema, rng=noise(5)).prep
    release = prep.release
    d = len(COLS)
    assert release.noise_multiplier == STATISTICS_NOISE_MULTIPLIER
    assert release.sensitivity == pytest.approx(math.sqrt(3 * d + 1))
    assert release.sigma == pytest.approx(STATISTICS_NOISE_MULTIPLIER * math.sqrt(3 * d + 1))
    assert release.histogram_columns == ("k",)
    assert release.extra_delta == THRESHOLD_DELTA
    z = -NormalDist().inv_cdf(THRESHOLD_DELTA)
    assert release.threshold == pytest.approx(1 + release.sigma * z)
    # Known answer: the documented draw order on the given stream.
    expected = _exact_statistics(df, SILO, [*COLS, "k"], schema) \
        + release.sigma * noise(5).standard_normal((3, d))
    np.testing.assert_allclose(np.stack([release.sums, release.squares, release.counts]),
                               expected, rtol=1e-12)
    # The derived parameters follow from the noisy values alone.
    n = np.maximum(release.counts, 1.0)
    np.testing.assert_allclose(prep.mean, np.clip(release.sums / n, -1, 1))
    assert (prep.scale >= MIN_SCALE).all()
    assert (prep.scale <= 1).all()


def test_the_noise_std_matches_the_multiplier_statistically():
    df = table(30)
    exact = _exact_statistics(df, SILO, COLS, SCHEMA)
    draws = []
    for seed in range(300):
        r = prepare(df, SILO, COLS, rng=noise(1000 + seed)).prep.release
        draws.append((np.stack([r.sums, r.squares, r.counts]) - exact) / r.sigma)
    z = np.array(draws).ravel()  # 300 * 3 * 7 standardised noise values
    assert r.sigma == pytest.approx(STATISTICS_NOISE_MULTIPLIER * math.sqrt(3 * len(COLS)))
    assert abs(z.mean()) < 0.1
    assert 0.95 < z.std() < 1.05


def test_one_extreme_value_moves_the_preparation_by_its_sensitivity_only():
    df = table(2000)
    schema = TableSchema(features=tuple(COLS), kinds=tuple((c, "amount") for c in COLS))
    before = prepare(df, SILO, COLS, schema, rng=noise(3)).prep
    after = prepare(df.assign(**{COLS[5]: df[COLS[5]].where(df.index != 7, 1e12)}),
                    SILO, COLS, schema, rng=noise(3)).prep
    diff = np.stack([after.release.sums - before.release.sums,
                     after.release.squares - before.release.squares,
                     after.release.counts - before.release.counts])
    assert np.abs(diff[:, [c for c in range(len(COLS)) if c != 5]]).max() < 1e-9
    # One cell, now clipped to the top of its range: |delta u| <= 2, |delta u^2| <= 1.
    assert abs(diff[0, 5]) <= 2
    assert abs(diff[1, 5]) <= 1
    assert diff[2, 5] == 0
    assert np.abs(after.mean - before.mean).max() <= 2 / 1900
    np.testing.assert_allclose(after.scale, before.scale, atol=0.01)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 30))
def test_adding_one_person_moves_the_statistics_by_at_most_the_sensitivity(data, n):
    cell = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.just(np.nan),
                     st.sampled_from([0.0, 1.0, 1e12, -1e12, 0.5]))
    names = ("a", "b", "c", "d")
    kinds = (("a", "amount"), ("b", "rate"), ("c", "signed_log"))
    rows = data.draw(st.lists(st.tuples(*[cell] * 4), min_size=n + 1, max_size=n + 1))
    df = pd.DataFrame(rows, columns=names).astype(np.float64)
    df.insert(0, "id", [str(i) for i in range(n + 1)])
    for col in names:  # a column entirely empty is refused by design
        df.loc[0, col] = 1.0 if df[col].iloc[1:].isna().all() else df.loc[0, col]
    schema = TableSchema("id", "plain", names, kinds=kinds)
    with_person = _exact_statistics(df, "s", list(names), schema)
    without = _exact_statistics(df.iloc[:-1], "s", list(names), schema) \
        if df.iloc[:-1][list(names)].notna().any().all() else None
    if without is not None:
        assert np.linalg.norm(with_person - without) <= math.sqrt(3 * len(names)) + 1e-9


def test_the_same_secret_and_table_give_the_same_preparation_another_secret_another(
        tmp_path: Path):
    df = table(300)
    df.loc[[4, 9], COLS[1]] = np.nan
    for name in ("one", "two"):
        (tmp_path / name / SILO).mkdir(parents=True)
        df.to_parquet(tmp_path / name / SILO / "features.parquet", index=False)
    a = load_silo(tmp_path / "one" / SILO, SILO)
    again = load_silo(tmp_path / "one" / SILO, SILO)
    other = load_silo(tmp_path / "two" / SILO, SILO)  # a secret of its own
    secret = tmp_path / "one" / SILO / SECRET_FILE.format(party=SILO)
    assert secret.exists()
    assert os.stat(secret).st_mode & 0o077 == 0
    assert a.prep.release.private
    np.testing.assert_array_equal(a.x, again.x)
    np.testing.assert_array_equal(a.prep.mean, again.prep.mean)
    assert not np.allclose(a.prep.mean, other.prep.mean)
    assert not np.array_equal(a.x, other.x)
    exact = prepare(df, SILO, COLS, silo_schema(tmp_path, SILO), rng=None)
    assert not np.allclose(a.prep.mean, exact.prep.mean)
    assert a.columns == exact.columns
    # The stream is addressed by the table's content: the same rows in another order give the
    # same preparation (the same release), a changed table another one.
    df.iloc[::-1].to_parquet(tmp_path / "one" / SILO / "features.parquet", index=False)
    shuffled = load_silo(tmp_path / "one" / SILO, SILO)
    np.testing.assert_array_equal(shuffled.prep.mean, a.prep.mean)
    np.testing.assert_array_equal(shuffled.x, a.x[::-1])
    assert table_digest(df) == table_digest(df.iloc[::-1])
    assert table_digest(df) != table_digest(df.assign(**{COLS[0]: df[COLS[0]] + 1e-9}))


def test_with_a_keystore_the_secret_lives_in_it(tmp_path: Path):
    from crypto.at_rest import Keystore

    store = Keystore.init(tmp_path / "keys")
    (tmp_path / SILO).mkdir()
    table(100).to_parquet(tmp_path / SILO / "features.parquet", index=False)
    m = load_silo(tmp_path / SILO, SILO, store)
    assert (tmp_path / "keys" / SECRET_FILE.format(party=SILO)).exists()
    assert not (tmp_path / SILO / SECRET_FILE.format(party=SILO)).exists()
    np.testing.assert_array_equal(load_silo(tmp_path / SILO, SILO, store).x, m.x)


def test_category_values_come_from_a_noisy_thresholded_count():
    n = 6000
    values = np.where(np.arange(n) < 3500, 1.0, 2.0)
    values[-1] = 7.0  # held by one person: must not appear
    values[-2] = np.nan
    df = pd.DataFrame({"id": [str(i) for i in range(n)], "k": values,
                       "a": np.linspace(0, 1, n)})
    schema = TableSchema("id", "plain", ("a", "k"), kinds=(("k", "category"),))
    m = prepare(df, "s", ["a", "k"], schema, rng=noise(9))
    assert m.columns == ["a", "a__missing", "k=1", "k=2", "k=missing"]
    assert m.prep.release.sensitivity == pytest.approx(2.0)  # sqrt(3 * 1 + 1)
    assert m.x[-1, 2:].sum() == 0  # the rare value: like no known group
    assert m.x[-2, -1] == 1
    exact = prepare(df, "s", ["a", "k"], schema, rng=None)
    assert "k=7" in exact.columns


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_model_inputs_stay_finite_and_bounded_on_awkward_tables(data, n, seed):
    finite = st.floats(-1e15, 1e15, allow_nan=False, width=64)
    cell = st.one_of(finite, st.just(np.nan), st.integers(0, 1000).map(float))
    constant = data.draw(finite)
    cols = {name: data.draw(st.lists(cell, min_size=n, max_size=n), label=name)
            for name in ("a", "b", "c")}
    cols["const"] = [constant] * n
    cols["k"] = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, -3.0, np.nan]),
                                   min_size=n, max_size=n), label="k")
    df = pd.DataFrame({"id": [str(i) for i in range(n)], **cols})
    for name in ("a", "b", "c"):  # a column entirely empty is refused by design
        if df[name].isna().all():
            df.loc[0, name] = 1.0
    schema = TableSchema("id", "plain", ("a", "b", "c", "const", "k"),
                         kinds=(("a", "amount"), ("b", "signed_log"), ("c", "rate"),
                                ("k", "category")))
    m = prepare(df, "s", ["a", "b", "c", "const", "k"], schema, rng=noise(seed))
    assert np.isfinite(m.x).all()
    assert np.abs(m.x).max() <= 2 / MIN_SCALE + 1e-3
    assert m.x.shape == (n, len(m.columns))
    np.testing.assert_array_equal(m.prep.transform(df), m.x)


def test_ten_rows_with_missing_cells_and_a_constant_column():
    df = table(10)
    df.loc[[0, 3], COLS[1]] = np.nan
    df[COLS[2]] = 4.0
    for seed in range(20):
        m = prepare(df, SILO, COLS, rng=noise(seed))
        assert np.isfinite(m.x).all()
        assert np.abs(m.x).max() <= 2 / MIN_SCALE


def test_the_mechanism_is_stated_for_the_ledger():
    mech = statistics_mechanism()
    assert mech["mechanism"] == "gaussian"
    assert mech["noise_multiplier"] == STATISTICS_NOISE_MULTIPLIER
    assert mech["history"] == [(STATISTICS_NOISE_MULTIPLIER, 1.0, 1)]
    assert mech["extra_delta"] == THRESHOLD_DELTA


def test_prepare_on_generated_tables():
    from simulations.data.population import PopulationConfig, generate

    pop = generate(PopulationConfig(users=2000, seed=4, missing_rate=0.1))
    for silo, tbl in pop.silos.items():
        schema = silo_schema(Path("/nonexistent"), silo)
        m = prepare(tbl, silo, feature_names(silo), schema, rng=noise())
        assert m.columns == [*feature_names(silo), *(f"{c}__missing" for c in feature_names(silo))]
        assert np.isfinite(m.x).all()
        np.testing.assert_array_equal(m.prep.transform(tbl), m.x)


# ---- the fitted preparation on new rows ---------------------------------------------------------

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


@pytest.mark.parametrize("rng", [None, 0])
def test_new_rows_use_the_fitted_statistics(rng):
    train = _uci_like(2000, 2)
    m = prepare(train, "payments", list(CATEGORY_SCHEMA.features), CATEGORY_SCHEMA,
                rng=None if rng is None else noise(rng))
    prep = m.prep
    new = _uci_like(500, 3)
    new["age"] *= 3.0  # everyone three times older: the shift must survive the preparation
    x = prep.transform(new)
    age = m.columns.index("age")
    assert x[:, age].mean() - m.x[:, age].mean() > 0.5 * m.x[:, age].std()
    assert x.shape == (500, len(m.columns))
    assert x.dtype == np.float32
    # Rows of the training table transform to exactly their training inputs.
    np.testing.assert_array_equal(prep.transform(train.iloc[[5, 0, 9]]), m.x[[5, 0, 9]])


def test_new_rows_unseen_categories_empty_columns_and_new_missing_cells():
    train = _uci_like(1000, 4)
    m = prepare(train, "payments", list(CATEGORY_SCHEMA.features), CATEGORY_SCHEMA, rng=None)
    prep = m.prep
    new = train.iloc[:4].copy()
    new["pay"] = [42.0, np.nan, 0.0, -2.0]  # 42 never seen
    new["sex"] = [7.0, np.nan, 1.0, 2.0]  # 7 never seen; missing has its column anyway
    new["bill"] = np.nan  # entirely empty in the new rows: imputed, no error
    new["age"] = [np.nan, 30.0, np.nan, 40.0]  # missing where training had no missing cell
    x = prep.transform(new)
    cols = m.columns
    pay = [i for i, c in enumerate(cols) if c.startswith("pay=")]
    sex = [i for i, c in enumerate(cols) if c.startswith("sex=")]
    assert x[0, pay].sum() == 0  # unseen value: all zero
    assert x[1, cols.index("pay=missing")] == 1
    assert x[1, pay].sum() == 1
    assert x[2, cols.index("pay=0")] == 1
    assert x[0, sex].sum() == 0
    assert x[1, cols.index("sex=missing")] == 1
    assert x[3, cols.index("sex=2")] == 1
    assert (x[:, cols.index("bill")] == 0).all()  # the fill is the fitted mean
    assert (x[:, cols.index("bill__missing")] == 1).all()
    assert (x[[0, 2], cols.index("age")] == 0).all()
    np.testing.assert_array_equal(x[:, cols.index("age__missing")], [1, 0, 1, 0])
    assert np.isfinite(x).all()


def test_new_negative_values_in_a_log_column_are_clipped():
    df = table(200)
    df["password_age_days"] = np.random.default_rng(1).lognormal(4, 1.5, 200)
    schema = silo_schema(Path("/nonexistent"), SILO)
    m = prepare(df, SILO, COLS, schema, rng=noise())
    col = COLS.index("password_age_days")
    assert m.prep.transforms[col] == "log1p"
    new = df.iloc[:2].copy()
    new["password_age_days"] = [-5.0, 0.0]
    x = m.prep.transform(new)
    assert np.isfinite(x).all()
    assert x[0, col] == x[1, col]


def test_preparation_is_immutable_and_checks_new_tables():
    m = prepare(table(), SILO, COLS, rng=noise())
    with pytest.raises(ValueError, match="read-only"):
        m.prep.mean[0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        m.prep.release.sums[0] = 1.0
    with pytest.raises(SiloDataError, match=f"missing column.*{COLS[0]}"):
        m.prep.transform(table().drop(columns=COLS[0]))
    with pytest.raises(SiloDataError, match="not numeric"):
        m.prep.transform(table().assign(**{COLS[1]: "x"}))
    with pytest.raises(SiloDataError, match="infinite"):
        m.prep.transform(table().assign(**{COLS[1]: np.inf}))


# ---- text category columns -----------------------------------------------------------------

TEXT_SCHEMA = TableSchema("id", "plain", ("a", "job"))  # "job" undeclared: auto, detected


def _text_table(n: int = 1000, seed: int = 3) -> pd.DataFrame:
    """`job`: three common values (with stray spaces), one held by one person, empty cells."""
    rng = np.random.default_rng(seed)
    job = rng.choice(["clerk", " farmer", "Teacher "], n).astype(object)
    job[0], job[1], job[2] = "astronaut", "", None  # one person; blank; missing
    return pd.DataFrame({"id": [f"P{i}" for i in range(n)], "a": rng.normal(size=n), "job": job})


def test_a_text_column_prepares_and_a_value_held_by_one_person_is_not_kept(monkeypatch):
    df = _text_table()
    m = prepare(df, "s", ["a", "job"], TEXT_SCHEMA, rng=noise(2))
    release = m.prep.release
    assert release.histogram_columns == ("job",)  # counted like a numeric category column
    assert release.sensitivity == pytest.approx(2.0)  # sqrt(3 * 1 + 1)
    # At the ledger's multiplier a value needs a noisy count above ~1,200: on 1,000 rows none
    # is kept, and everyone present is "other" (declare public values to keep them).
    assert release.threshold > len(df)
    assert m.columns == ["a", "a__missing", "job=other", "job=missing"]
    np.testing.assert_array_equal(m.x[:3, 2:], [[1, 0], [0, 1], [0, 1]])
    # With less noise (here 1 instead of the ledger's), the common values pass, the
    # astronaut never does: the threshold is what keeps one person's value out.
    monkeypatch.setattr("clients.silo.data.STATISTICS_NOISE_MULTIPLIER", 1.0)
    for seed in range(20):
        m = prepare(df, "s", ["a", "job"], TEXT_SCHEMA, rng=noise(seed))
        assert m.columns[2:] == ["job='Teacher'", "job='clerk'", "job='farmer'", "job=other",
                                 "job=missing"]
    # Known answer: one draw per value seen, in code point order (stripped, case kept), after
    # the numeric statistics (in `prepare`) on the same stream.
    cells = text_cells(df["job"])
    seen, counts = np.unique(cells.dropna().to_numpy(dtype=str), return_counts=True)
    assert list(seen) == ["Teacher", "astronaut", "clerk", "farmer"]
    for seed in range(5):
        noisy = counts + 300.0 * noise(seed).standard_normal(len(seen))
        want = tuple(seen[noisy > 330.0])
        assert common_texts(cells, "job", noise(seed), 300.0, 330.0) == want


def test_declared_text_values_are_kept_whatever_their_count_and_cost_nothing():
    schema = TableSchema("id", "plain", ("a", "job"), kinds=(("job", "category"),),
                         categories=(("job", ("astronaut", " clerk")),))
    df = _text_table()
    m = prepare(df, "s", ["a", "job"], schema, rng=noise(2))
    assert m.columns == ["a", "a__missing", "job='astronaut'", "job='clerk'", "job=other",
                         "job=missing"]
    assert m.prep.release.histogram_columns == ()
    assert m.prep.release.sensitivity == pytest.approx(math.sqrt(3))
    assert m.x[0, 2] == 1  # the one person's value: public, so it has its column
    clerk = (df["job"] == "clerk").to_numpy()
    np.testing.assert_array_equal(m.x[clerk, 3], 1)
    assert m.x[~clerk, 3].sum() == m.x[0, 3] == 0
    # Declared numbers for a text column (or texts for numbers): refused with the fix.
    numbers = TableSchema("id", "plain", ("a", "job"), kinds=(("job", "category"),),
                          categories=(("job", (1.0, 2.0)),))
    with pytest.raises(SiloDataError, match="'job' holds text but its declared categories are "
                                            "numbers"):
        prepare(df, "s", ["a", "job"], numbers, rng=noise(2))


def test_a_text_column_keeps_at_most_max_categories_values_the_most_common():
    # v00 held once, v01 twice, ... v69 seventy times: the 64 most common are kept.
    job = [f"v{i:02d}" for i in range(70) for _ in range(i + 1)]
    df = pd.DataFrame({"id": [str(i) for i in range(len(job))], "a": 0.0, "job": job})
    m = prepare(df, "s", ["a", "job"], TEXT_SCHEMA, rng=None)
    assert MAX_CATEGORIES == 64
    assert m.columns[2:] == [*(f"job='v{i:02d}'" for i in range(6, 70)), "job=other",
                             "job=missing"]
    assert m.x[: 21, -2].sum() == 21  # v00..v05: 1 + 2 + ... + 6 people, all "other"


def test_only_feature_names_and_kept_values_name_anything_leaving_the_silo():
    """Reason codes travel as feature names (`features_of`), never as one-hot column names; the
    one-hot names hold kept values only."""
    from clients.silo.explain import features_of

    df = _text_table()
    df.loc[3, "job"] = "+86 138 0000 0003"  # an identifier typed into the wrong column
    m = prepare(df, "s", ["a", "job"], TEXT_SCHEMA, rng=noise(2))
    assert features_of(m) == ["a", "job"]
    exact = prepare(df, "s", ["a", "job"], TEXT_SCHEMA, rng=None)  # a reference, not released
    assert "job='+86 138 0000 0003'" in exact.columns
    assert not any("0003" in c or "astronaut" in c for c in m.columns)


def test_text_in_a_column_declared_numeric_is_refused_with_a_count_never_the_values():
    df = _text_table(50)
    df["a"] = df["a"].astype(object)
    df.loc[[4, 9], "a"] = "C0042"
    schema = TableSchema("id", "plain", ("a", "job"), kinds=(("a", "amount"),))
    with pytest.raises(SiloDataError, match=r"column 'a' is not numeric: 2 of 50 cells are text "
                                            "in a column declared amount") as err:
        prepare(df, "s", ["a", "job"], schema, rng=noise())
    assert "C0042" not in str(err.value)
    assert '"kinds": {"a": "category"}' in str(err.value)


_word = st.text(alphabet="abAB é-", min_size=1, max_size=4).map(str.strip).filter(bool)


@settings(max_examples=40, deadline=None)
@given(kept=st.lists(_word, min_size=1, max_size=4, unique=True), data=st.data())
def test_property_text_categories_one_hot_consistently(kept, data):
    """A kept value lights its own column, any other value (rare or unseen) `=other`, an empty
    or blank cell `=missing`; surrounding spaces never matter, case always does."""
    others = st.one_of(_word.filter(lambda w: w not in kept), st.just("zz"))
    cell = st.one_of(st.sampled_from(kept), others, st.sampled_from(["", "  ", None]))
    pad = st.sampled_from(["", " ", "\t"])
    cells = data.draw(st.lists(st.tuples(cell, pad, pad), min_size=1, max_size=12))
    column = [None if c is None else f"{left}{c}{right}" for c, left, right in cells]
    df = pd.DataFrame({"id": [str(i) for i in range(len(column))], "a": 1.0, "job": column})
    schema = TableSchema("id", "plain", ("a", "job"), kinds=(("job", "category"),),
                         categories=(("job", tuple(kept)),))
    m = prepare(df, "s", ["a", "job"], schema, rng=noise())
    names = m.columns[2:]
    assert names == [*(f"job={v!r}" for v in sorted(kept)), "job=other", "job=missing"]
    block = m.x[:, 2:]
    assert (block.sum(axis=1) == 1).all()
    for row, (c, _, _) in enumerate(cells):
        value = None if c is None else c.strip()
        want = ("job=missing" if not value else
                f"job={value!r}" if value in kept else "job=other")
        assert names[int(block[row].argmax())] == want
    np.testing.assert_array_equal(m.prep.transform(df.iloc[::-1]), m.x[::-1])


def test_codes_arriving_as_floats_and_na_words_meet_the_fitted_values():
    """A text column of codes read back as floats at scoring time ("1.0") must meet its
    fitted value "1"; the words pandas reads as missing in a CSV are missing in parquet too."""
    fitted = pd.Series(["A", "B", "1", "1", "A", "nan", "None", " "], dtype=object)
    assert text_cells(fitted).tolist()[:5] == ["A", "B", "1", "1", "A"]
    assert text_cells(fitted).isna().tolist()[5:] == [True, True, True]
    later = pd.Series([1.0, np.nan, 2.5, -3.0])
    assert text_cells(later).fillna("<missing>").tolist() == ["1", "<missing>", "2.5", "-3"]
    schema = TableSchema("id", "plain", ("job",), kinds=(("job", "category"),),
                         categories=(("job", ("1", "A")),))
    df = pd.DataFrame({"id": ["p0", "p1", "p2"], "job": ["1", "A", "1"]})
    prep = prepare(df, "s", ["job"], schema, rng=noise(1)).prep
    x = prep.transform(pd.DataFrame({"id": ["p0", "p1"], "job": [1.0, np.nan]}))
    assert prep.columns == ("job='1'", "job='A'", "job=other", "job=missing")
    np.testing.assert_array_equal(x, [[1, 0, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize(("values", "message"), [
    ([True, False, True], "stored as true/false; store it as 0/1"),
    (pd.to_datetime(["2020-01-01", "2020-02-01", "2021-01-01"]), "stored as dates or durations"),
])
def test_true_false_and_dates_are_refused_with_the_fix_even_as_categories(values, message):
    df = pd.DataFrame({"id": ["p0", "p1", "p2"], "f": values})
    for kinds in ((("f", "category"),), ()):
        schema = TableSchema("id", "plain", ("f",), kinds=kinds)
        with pytest.raises(SiloDataError, match=message):
            prepare(df, "s", ["f"], schema, rng=noise(1))


def test_a_csv_reads_declared_text_as_text_and_guesses_types_over_the_whole_file(tmp_path):
    path = tmp_path / "features.csv"
    rows = 300_000  # past pandas' chunk for type guessing: chunk by chunk "7" became "7.0" too
    pd.DataFrame({"id": [f"p{i}" for i in range(rows)], "code": ["01", "02"] * (rows // 2),
                  "mixed": ["7", ""] * 135_000 + ["x"] * 30_000}).to_csv(path, index=False)
    table = read_table(path, "s", None, "id", ["code"])
    assert set(table["code"]) == {"01", "02"}
    assert set(text_cells(table["mixed"]).dropna()) == {"7", "x"}


@pytest.mark.slow  # a process of its own
def test_preparing_a_table_loads_neither_torch_nor_opacus():
    """Under the deployment engine each message a silo answers is a process of its own, and
    the light ones (hello, the PSI steps) prepare the silo's table: importing Opacus there cost
    each about 3.5 s of CPU (measured: a deployed run's hello and psi_blind processes)."""
    code = ("import sys, numpy as np, pandas as pd; from clients.silo.data import prepare; "
            "cols = ['a', 'b']; rng = np.random.default_rng(0); "
            "df = pd.DataFrame(rng.random((40, 2)), columns=cols); "
            "df.insert(0, 'phone', [f'138 {i:04d} {i:04d}' for i in range(40)]); "
            "assert prepare(df, 'device', cols, rng=rng).prep.release.private; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'opacus')))")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(root)},
                          cwd=root, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
