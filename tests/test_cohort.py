"""A later cohort with behaviour drift: same people and order, drift in the risky direction,
determinism, encryption, refusals, and preparation with the training table's statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.protocol.schema import ID_COLUMN, SILOS
from clients.protocol.tables import SiloDataError
from clients.silo.cohorts import load_cohort
from clients.silo.data import load_silo
from crypto.at_rest import AtRestError, Keystore
from simulations.data.cohort import write_later_cohort
from simulations.data.population import PopulationConfig, generate, write_parties

CONFIG = PopulationConfig(users=3_000, seed=11)


@pytest.fixture(scope="module")
def parties(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "parties"
    write_parties(generate(CONFIG), root)
    return root


def _table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def test_same_people_same_order_and_cohort_json(parties: Path):
    paths = write_later_cohort(parties, name="same", drift=0.3)
    assert set(paths) == set(SILOS)
    for silo in SILOS:
        assert paths[silo] == parties / silo / "cohorts" / "same" / "features.parquet"
        base, later = _table(parties / silo / "features.parquet"), _table(paths[silo])
        assert list(later.columns) == list(base.columns)
        pd.testing.assert_series_equal(later[ID_COLUMN], base[ID_COLUMN])
        assert (later.dtypes.iloc[1:] == np.float64).all()
        assert not later.drop(columns=ID_COLUMN).equals(base.drop(columns=ID_COLUMN))
        info = json.loads((paths[silo].parent / "cohort.json").read_text())
        assert info["name"] == "same"
        assert info["drift"] == 0.3
        assert info["seed"] == CONFIG.seed


def _shift(parties: Path, name: str, silo: str) -> pd.Series:
    """How far the mean of each model input of the cohort, prepared with the training
    statistics, lies from the training table's, in standard deviations of the training inputs
    (the noisy statistics centre and scale the training inputs only approximately)."""
    base = load_silo(parties / silo, silo)
    x = load_cohort(parties / silo, silo, name, None, base)
    sd = base.x.std(axis=0)
    return pd.Series((x.mean(axis=0) - base.x.mean(axis=0)) / np.where(sd > 0, sd, 1.0),
                     index=base.columns)


def test_no_drift_keeps_distributions_and_drift_moves_towards_risk(parties: Path):
    write_later_cohort(parties, name="d0", drift=0.0)
    write_later_cohort(parties, name="d1", drift=1.0)
    for silo in SILOS:
        stable = _shift(parties, "d0", silo)
        features = [c for c in stable.index if "__" not in c]
        # 2,900 people: the noise on a mean is about 0.03 standard deviations.
        assert stable[features].abs().max() < 0.1, stable[features].abs().idxmax()
    pay = _shift(parties, "d1", "payments")
    assert pay["overdue_count"] > 0.3
    assert pay["on_time_repayment_rate"] < -0.3
    assert pay["high_risk_merchant_share"] > 0.2
    device = _shift(parties, "d1", "device")
    assert device["two_factor_on"] < -0.1
    assert device["rebinding_count"] > 0.1


def test_deterministic_per_seed(parties: Path, tmp_path: Path):
    first = write_later_cohort(parties, name="a", drift=0.5, seed=3)
    again = write_later_cohort(parties, name="b", drift=0.5, seed=3)
    other = write_later_cohort(parties, name="c", drift=0.5, seed=4)
    for silo in SILOS:
        pd.testing.assert_frame_equal(_table(first[silo]), _table(again[silo]))
        assert not _table(first[silo]).equals(_table(other[silo]))


def test_refuses_to_overwrite_and_bad_names(parties: Path):
    path = write_later_cohort(parties, name="keep", drift=0.2)["payments"]
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_later_cohort(parties, name="keep", drift=0.9)
    assert path.read_bytes() == before
    write_later_cohort(parties, name="keep", drift=0.9, overwrite=True)
    assert path.read_bytes() != before
    for bad in ("", "a/b", "../x", "x" * 41, "later cohort"):
        with pytest.raises(SiloDataError, match="cohort name"):
            write_later_cohort(parties, name=bad)
        base = load_silo(parties / "payments", "payments")
        with pytest.raises(SiloDataError, match="cohort name"):
            load_cohort(parties / "payments", "payments", bad, None, base)
    with pytest.raises(ValueError, match="drift"):
        write_later_cohort(parties, name="neg", drift=-0.1)


def test_refuses_parties_not_made_from_population_json(tmp_path: Path):
    root = tmp_path / "parties"
    write_parties(generate(CONFIG), root)
    path = root / "device" / "features.parquet"
    pd.read_parquet(path).iloc[::-1].to_parquet(path, index=False)  # another row order
    with pytest.raises(ValueError, match=r"'device'.*rows hold another person") as err:
        write_later_cohort(root)
    assert "+86" not in str(err.value)
    assert not (root / "payments" / "cohorts").exists()  # nothing written
    with pytest.raises(FileNotFoundError, match=r"population\.json"):
        write_later_cohort(tmp_path / "nowhere")


def test_encrypted_cohort_round_trip(tmp_path: Path):
    store = Keystore.init(tmp_path / "keys")
    root = tmp_path / "enc"
    write_parties(generate(CONFIG), root, store=store)
    paths = write_later_cohort(root, name="q3", drift=0.3, store=store)
    plain = tmp_path / "plain"
    write_parties(generate(CONFIG), plain)
    write_later_cohort(plain, name="q3", drift=0.3)
    for silo in SILOS:
        assert paths[silo].name == "features.parquet.enc"
        assert b"PAR1" not in paths[silo].read_bytes()[:64]
        base = load_silo(root / silo, silo, store)
        x = load_cohort(root / silo, silo, "q3", store, base)
        # The same secret and the same table give the same (noisy) preparation.
        secret = f"randomness-{silo}.key"
        shutil.copy(tmp_path / "keys" / secret, plain / silo / secret)
        expected = load_cohort(plain / silo, silo, "q3", None, load_silo(plain / silo, silo))
        np.testing.assert_array_equal(x, expected)
    base = load_silo(root / "social", "social", store)
    with pytest.raises(AtRestError, match="keystore"):
        load_cohort(root / "social", "social", "q3", None, base)
    # Bound to the cohort's name: a cohort copied under another name does not decrypt.
    moved = root / "social" / "cohorts" / "other"
    moved.mkdir()
    (moved / "features.parquet.enc").write_bytes(paths["social"].read_bytes())
    with pytest.raises(AtRestError):
        load_cohort(root / "social", "social", "other", store, base)


def test_load_cohort_uses_the_training_statistics(parties: Path):
    silo = "social"
    base = load_silo(parties / silo, silo)
    folder = parties / silo / "cohorts" / "copy"
    folder.mkdir(parents=True)
    table = _table(parties / silo / "features.parquet")
    table.to_parquet(folder / "features.parquet", index=False)
    np.testing.assert_array_equal(load_cohort(parties / silo, silo, "copy", None, base), base.x)
    # Everyone 30 points (half a sd) better standing: refitting would hide it, the base
    # statistics show it.
    table.assign(contacts_avg_standing=table["contacts_avg_standing"] + 30.0).to_parquet(
        folder / "features.parquet", index=False)
    x = load_cohort(parties / silo, silo, "copy", None, base)
    col = base.columns.index("contacts_avg_standing")
    assert (x[:, col].mean() - base.x[:, col].mean()) / base.x[:, col].std() > 0.4
    # Other people, or another order, are refused without showing identifiers.
    table.iloc[::-1].to_parquet(folder / "features.parquet", index=False)
    with pytest.raises(SiloDataError, match="another person") as err:
        load_cohort(parties / silo, silo, "copy", None, base)
    assert "86" not in str(err.value)
    table.iloc[:-1].to_parquet(folder / "features.parquet", index=False)
    with pytest.raises(SiloDataError, match="rows, but the training table has"):
        load_cohort(parties / silo, silo, "copy", None, base)
    with pytest.raises(SiloDataError, match="no table"):
        load_cohort(parties / silo, silo, "absent", None, base)
