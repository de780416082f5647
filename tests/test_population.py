"""The population generator: shapes, rates, identities, the label model and writing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from clients.protocol.schema import (
    AUTHORITY,
    ID_COLUMN,
    LABEL_COLUMN,
    SILO_FEATURES,
    SILOS,
    feature_names,
)
from crypto.identity import normalize_phones
from simulations.data.features import MISSING_COLUMNS
from simulations.data.population import Population, PopulationConfig, generate, write_parties

SMALL = PopulationConfig(users=20_000, seed=7)


@pytest.fixture(scope="module")
def pop() -> Population:
    return generate(PopulationConfig())


@pytest.fixture(scope="module")
def small() -> Population:
    return generate(SMALL)


def _e164(frame: pd.DataFrame) -> pd.Series:
    return normalize_phones(frame[ID_COLUMN])


def _silo_with_truth(pop: Population, silo: str) -> pd.DataFrame:
    """The silo's rows joined to the truth on the normalised phone (authority's people only)."""
    table = pop.silos[silo].assign(**{ID_COLUMN: _e164(pop.silos[silo])})
    return table.merge(pop.truth, on=ID_COLUMN, how="inner", validate="one_to_one")


def test_same_seed_identical_and_other_seed_differs(small: Population, tmp_path: Path) -> None:
    again = generate(SMALL)
    pd.testing.assert_frame_equal(small.authority, again.authority)
    pd.testing.assert_frame_equal(small.truth, again.truth)
    for silo in SILOS:
        pd.testing.assert_frame_equal(small.silos[silo], again.silos[silo])
    first = write_parties(small, tmp_path / "a")
    second = write_parties(again, tmp_path / "b")
    for key, path in first.items():
        assert path.read_bytes() == second[key].read_bytes(), key

    other = generate(replace(SMALL, seed=8))
    assert not other.authority[ID_COLUMN].equals(small.authority[ID_COLUMN])
    assert not np.allclose(other.truth["p_true"], small.truth["p_true"])
    for silo in SILOS:
        assert not other.silos[silo].equals(small.silos[silo])


def test_columns_and_dtypes(small: Population) -> None:
    assert list(small.authority.columns) == [ID_COLUMN, LABEL_COLUMN, "real_name_verified",
                                             "card_bound", "days_since_severe_default"]
    assert small.authority[LABEL_COLUMN].dtype == np.int8
    assert set(small.authority[LABEL_COLUMN].unique()) == {0, 1}
    assert list(small.silos) == list(SILOS)
    for silo, table in small.silos.items():
        assert list(table.columns) == [ID_COLUMN, *feature_names(silo)]
        assert all(table[c].dtype == np.float64 for c in feature_names(silo)), silo
    for column in (ID_COLUMN, "p_true", LABEL_COLUMN, *(f"logit_{s}" for s in SILOS)):
        assert column in small.truth.columns
    assert small.truth["p_true"].dtype == np.float64
    assert len(small.truth) == len(small.authority) == SMALL.users


def test_default_rate(pop: Population) -> None:
    assert abs(pop.truth["p_true"].mean() - 0.06) < 0.002
    assert abs(pop.authority[LABEL_COLUMN].mean() - 0.06) < 0.01
    high = generate(PopulationConfig(users=50_000, seed=3, default_rate=0.10))
    assert abs(high.truth["p_true"].mean() - 0.10) < 0.002
    assert abs(high.authority[LABEL_COLUMN].mean() - 0.10) < 0.01


def test_coverage_and_outsiders(pop: Population) -> None:
    known = pd.Index(_e164(pop.authority))
    n_out = round(pop.config.outsiders * pop.config.users)
    outsider_sets = []
    for silo, cover in zip(SILOS, pop.config.coverage, strict=True):
        phones = _e164(pop.silos[silo])
        inside = phones.isin(known)
        assert abs(inside.sum() / len(known) - cover) < 0.01, silo
        assert (~inside).sum() == n_out > 0, silo
        outsider_sets.append(set(phones[~inside]))
    # Outsiders come from a shared pool: some overlap between silos, but not all.
    shared = outsider_sets[0] & outsider_sets[1]
    assert 0 < len(shared) < n_out


def test_phone_formats_normalise_to_one_identity(small: Population) -> None:
    patterns = {
        AUTHORITY: r"\+861[3-9]\d{9}",
        "payments": r"1[3-9]\d \d{4} \d{4}",
        "social": r"86-1[3-9]\d-\d{4}-\d{4}",
        "device": r"\(\+86\) 1[3-9]\d{9}",
    }
    tables = {AUTHORITY: small.authority, **small.silos}
    for party, table in tables.items():
        assert table[ID_COLUMN].str.fullmatch(patterns[party]).all(), party
        e164 = _e164(table)
        assert e164.is_unique, party
        assert e164.str.fullmatch(r"\+861[3-9]\d{9}").all(), party
    # The authority's copy is already E.164, and so is the truth's.
    assert _e164(small.authority).tolist() == small.authority[ID_COLUMN].tolist()
    assert small.truth[ID_COLUMN].tolist() == small.authority[ID_COLUMN].tolist()
    # Same person across parties: the silo's features at a normalised phone reproduce exactly
    # that person's part of the true logit, which fails if rows were paired with wrong phones.
    for silo in SILOS:
        joined = _silo_with_truth(small, silo)
        assert len(joined) == round(small.config.coverage[SILOS.index(silo)] * SMALL.users)
        recomputed = small.label_model.silo_logit(silo, joined)
        np.testing.assert_allclose(recomputed, joined[f"logit_{silo}"], rtol=0, atol=1e-9)


def test_silo_rows_are_shuffled_independently(small: Population) -> None:
    order = pd.Series(np.arange(SMALL.users), index=small.truth[ID_COLUMN])
    for silo in SILOS:
        phones = _e164(small.silos[silo])
        positions = order.reindex(phones).dropna().to_numpy()
        rho = np.corrcoef(positions, np.arange(len(positions)))[0, 1]
        assert abs(rho) < 0.05, silo


def test_label_is_the_documented_function_of_observed_features(small: Population) -> None:
    parts = small.truth[[f"logit_{s}" for s in SILOS]].sum(axis=1)
    logit = small.label_model.intercept + parts
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), small.truth["p_true"], rtol=1e-12)
    assert np.isclose(parts.std(ddof=0), SMALL.signal_scale, rtol=1e-9)


def test_missing_share(pop: Population) -> None:
    rate = pop.config.missing_rate
    for silo, table in pop.silos.items():
        for column in feature_names(silo):
            share = table[column].isna().mean()
            if column in MISSING_COLUMNS[silo]:
                assert abs(share - rate) < 0.004, (silo, column, share)
            else:
                assert share == 0, (silo, column)


def test_marginals(pop: Population) -> None:
    for silo in SILOS:
        table = pop.silos[silo]
        for feature in SILO_FEATURES[silo]:
            x = table[feature.name].dropna()
            if feature.kind == "rate":
                assert x.between(0, 1).all(), feature.name
            elif feature.kind == "flag":
                assert set(x.unique()) == {0.0, 1.0}, feature.name
            elif feature.kind == "count":
                assert (x >= 0).all(), feature.name
                assert (x == np.round(x)).all(), feature.name
            elif feature.kind == "amount":
                assert (x >= 0).all(), feature.name
                assert x.skew() > 1, feature.name
    pay = pop.silos["payments"]
    assert ((pay["overdue_count"] == 0) == (pay["overdue_max_days"] == 0)).all()
    assert 0.3 < (pay["wealth_holdings"] == 0).mean() < 0.8
    standing = pop.silos["social"]["contacts_avg_standing"].dropna()
    assert abs(standing.mean() - 600) < 10
    assert 45 < standing.std() < 75
    assert standing.between(300, 850).all()


def test_risk_directions(pop: Population) -> None:
    pay = _silo_with_truth(pop, "payments")
    dev = _silo_with_truth(pop, "device")
    soc = _silo_with_truth(pop, "social")
    more_risk = [
        (pay, "overdue_count"),
        (pay, "high_risk_merchant_share"),
        (dev, "rebinding_count"),
        (dev, "abnormal_location_logins"),
        (soc, "violation_reports"),
    ]
    less_risk = [
        (pay, "on_time_repayment_rate"),
        (dev, "two_factor_on"),
        (dev, "location_stability"),
        (soc, "contacts_avg_standing"),
    ]
    for table, column in more_risk:
        assert table[column].corr(table["p_true"], method="spearman") > 0.02, column
    for table, column in less_risk:
        assert table[column].corr(table["p_true"], method="spearman") < -0.02, column
    assert pay.loc[pay["overdue_max_days"] > 30, "p_true"].mean() > 2 * pay["p_true"].mean()


def test_oracle_auc(pop: Population) -> None:
    assert 0.84 <= pop.oracle_auc() <= 0.88
    subset = pop.truth[ID_COLUMN].iloc[:40_000]
    assert pop.oracle_auc(subset) == pytest.approx(
        roc_auc_score(pop.truth[LABEL_COLUMN][:40_000], pop.truth["p_true"][:40_000])
    )


def test_variance_shares() -> None:
    for shares in ((0.60, 0.25, 0.15), (0.2, 0.5, 0.3)):
        got = generate(PopulationConfig(users=20_000, signal_share=shares)).variance_shares()
        for silo, want in zip(SILOS, shares, strict=True):
            assert abs(got[silo] - want) < 0.01, (silo, got)


def _model_ready(pop: Population, silo: str) -> pd.DataFrame:
    """Log1p for amounts and counts, median imputation, indexed by E.164 phone."""
    table = pop.silos[silo].set_index(_e164(pop.silos[silo])).drop(columns=ID_COLUMN)
    for feature in SILO_FEATURES[silo]:
        x = table[feature.name]
        if feature.kind in ("amount", "count"):
            x = np.log1p(x)
        table[feature.name] = x.fillna(x.median())
    return table


def test_payments_alone_is_weaker_than_all_silos(pop: Population) -> None:
    tables = {s: _model_ready(pop, s) for s in SILOS}
    labels = pop.truth.set_index(ID_COLUMN)[LABEL_COLUMN]
    common = labels.index
    for table in tables.values():
        common = common.intersection(table.index)
    y = labels.loc[common].to_numpy()
    half = len(common) // 2

    def test_auc(X: pd.DataFrame) -> float:
        X = ((X - X.mean()) / X.std()).to_numpy()
        model = LogisticRegression(max_iter=1000).fit(X[:half], y[:half])
        return roc_auc_score(y[half:], model.predict_proba(X[half:])[:, 1])

    payments_only = test_auc(tables["payments"].loc[common])
    everything = test_auc(pd.concat([tables[s].loc[common] for s in SILOS], axis=1))
    assert everything - payments_only >= 0.03, (payments_only, everything)
    # A correctly specified model gets close to the oracle on the intersection.
    assert everything > pop.oracle_auc(common) - 0.02


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"users": 999}, "users"),
        ({"seed": -1}, "seed"),
        ({"default_rate": 0.0}, "default_rate"),
        ({"default_rate": 0.6}, "default_rate"),
        ({"missing_rate": 0.7}, "missing_rate"),
        ({"outsiders": -0.1}, "outsiders"),
        ({"coverage": (0.97, 0.4, 0.95)}, "coverage"),
        ({"coverage": (0.97, 0.93)}, "coverage"),
        ({"signal_share": (0.6, 0.3, 0.15)}, "signal_share"),
        ({"signal_scale": 0.0}, "signal_scale"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PopulationConfig(**kwargs)


def test_write_parties_layout_and_refuses_overwrite(small: Population, tmp_path: Path) -> None:
    root = tmp_path / "parties"
    paths = write_parties(small, root)
    assert paths[AUTHORITY] == root / "authority" / "labels.parquet"
    for silo in SILOS:
        assert paths[silo] == root / silo / "features.parquet"
        back = pd.read_parquet(paths[silo])
        assert list(back.columns) == [ID_COLUMN, *feature_names(silo)]
        assert len(back) == len(small.silos[silo])
    assert paths["truth"] == root / "simulation" / "truth.parquet"
    # The truth stays out of every party's folder.
    for party in (AUTHORITY, *SILOS):
        assert not list((root / party).glob("truth*"))
    labels = pd.read_parquet(paths[AUTHORITY])
    assert labels[LABEL_COLUMN].dtype == np.int8
    assert json.loads(paths["config"].read_text())["users"] == SMALL.users
    assert PopulationConfig.from_json(paths["config"].read_text()) == small.config

    with pytest.raises(FileExistsError, match="overwrite"):
        write_parties(small, root)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "note.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_parties(small, tmp_path / "other")
    assert write_parties(small, root, overwrite=True)[AUTHORITY].exists()
