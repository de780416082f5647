"""Eligibility data: the generator's account-status columns, the config section, and the
authority's loader (order, encryption, real data, missing columns)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.protocol.schema import AUTHORITY, ID_COLUMN, LABEL_COLUMN, SILOS
from crypto.at_rest import Keystore
from crypto.identity import normalize_phones
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat, to_flat
from server.eligibility import (
    CARD,
    DEFAULT_DAYS,
    INELIGIBLE,
    REAL_NAME,
    EligibilityConfig,
    assess,
)
from server.labels import LabelDataError, load_authority, load_eligibility, load_labels
from simulations.data.population import Population, PopulationConfig, generate, write_parties
from simulations.data.real_data import import_parties, read_mapping

BIG = PopulationConfig(users=20_000, seed=5)
SMALL = PopulationConfig(users=3_000, seed=3)
NEW_COLUMNS = [REAL_NAME, CARD, DEFAULT_DAYS]


@pytest.fixture(scope="module")
def big() -> Population:
    return generate(BIG)


@pytest.fixture(scope="module")
def small() -> Population:
    return generate(SMALL)


# ---- generator ---------------------------------------------------------------------------------


def test_authority_columns_and_dtypes(big: Population):
    auth = big.authority
    assert list(auth.columns) == [ID_COLUMN, LABEL_COLUMN, *NEW_COLUMNS]
    assert auth[REAL_NAME].dtype == np.int8
    assert auth[CARD].dtype == np.int8
    assert auth[DEFAULT_DAYS].dtype == np.float64
    assert set(np.unique(auth[REAL_NAME])) == {0, 1}
    assert set(np.unique(auth[CARD])) == {0, 1}
    days = auth[DEFAULT_DAYS].dropna()
    assert (days >= 0).all()
    assert (days <= 3650).all()
    assert (days == days.round()).all()
    assert auth[DEFAULT_DAYS].isna().mean() > 0.9  # most people never defaulted severely


@pytest.mark.parametrize("rates", [(0.02, 0.04, 0.03), (0.1, 0.2, 0.08)])
def test_rates_near_the_configured_values(big: Population, rates):
    unverified, unbound, severe = rates
    pop = big if rates == (0.02, 0.04, 0.03) else generate(
        replace(BIG, unverified_rate=unverified, unbound_card_rate=unbound,
                severe_default_rate=severe))
    auth = pop.authority
    # 20,000 draws: the binomial standard error is at most 0.0028; allow about 3 of them.
    assert abs((auth[REAL_NAME] == 0).mean() - unverified) < 0.008
    assert abs((auth[CARD] == 0).mean() - unbound) < 0.008
    assert abs((auth[DEFAULT_DAYS] < 365).mean() - severe) < 0.008
    # Older defaults (1 to 10 years) exist too, so a longer window catches more people.
    assert (auth[DEFAULT_DAYS] >= 365).mean() > severe / 3


def test_zero_severe_default_rate_means_nobody_defaulted(small: Population):
    pop = generate(replace(SMALL, severe_default_rate=0.0, unverified_rate=0.0))
    assert pop.authority[DEFAULT_DAYS].isna().all()
    assert (pop.authority[REAL_NAME] == 1).all()


def test_recent_severe_defaults_go_with_the_label_and_the_true_risk(big: Population):
    recent = (big.authority[DEFAULT_DAYS] < 365).to_numpy()
    label = big.authority[LABEL_COLUMN].to_numpy() == 1
    assert recent[label].mean() > 4 * recent[~label].mean()
    p_true = big.truth["p_true"].to_numpy()  # same row order as the authority's table
    assert (big.truth[ID_COLUMN] == big.authority[ID_COLUMN]).all()
    top = p_true >= np.quantile(p_true, 0.9)
    low = p_true <= np.quantile(p_true, 0.5)
    assert recent[top & ~label].mean() > 2 * recent[low & ~label].mean()


def test_deterministic_per_seed_and_other_seed_differs(small: Population):
    again = generate(SMALL)
    pd.testing.assert_frame_equal(small.authority, again.authority)
    other = generate(replace(SMALL, seed=4))
    assert not np.array_equal(other.authority[DEFAULT_DAYS].isna(),
                              small.authority[DEFAULT_DAYS].isna())


def test_new_columns_leave_every_earlier_draw_unchanged(small: Population):
    """Other rates change only the new columns: they come from their own random stream, so the
    features, labels, phones and truth of a seed are what they were before the columns existed."""
    other = generate(replace(SMALL, unverified_rate=0.3, unbound_card_rate=0.3,
                             severe_default_rate=0.2))
    old = [ID_COLUMN, LABEL_COLUMN]
    pd.testing.assert_frame_equal(small.authority[old], other.authority[old])
    pd.testing.assert_frame_equal(small.truth, other.truth)
    for silo in SILOS:
        pd.testing.assert_frame_equal(small.silos[silo], other.silos[silo])
    assert not small.authority[REAL_NAME].equals(other.authority[REAL_NAME])


def test_earlier_draws_match_the_figures_recorded_before_the_change():
    """Recorded from the generator before the eligibility columns were added (seed 3, 5,000
    people): every party's phones in order, the labels, and sums of the truth and features."""
    pop = generate(PopulationConfig(users=5_000, seed=3))
    digest = hashlib.sha256()
    digest.update("\n".join(pop.authority[ID_COLUMN]).encode())
    digest.update(pop.authority[LABEL_COLUMN].to_numpy().tobytes())
    for silo in SILOS:
        digest.update("\n".join(pop.silos[silo][ID_COLUMN]).encode())
    assert digest.hexdigest() == (
        "7a849d5043129eaba5eb5a7751b3c2f763ed25498c42f80e78d3be057bf52e42")
    assert pop.truth["p_true"].sum() == pytest.approx(300.00000015143274, rel=1e-12)
    assert pop.silos["payments"]["overdue_count"].sum() == 3001.0
    assert np.nansum(pop.silos["device"]["password_age_days"]) == 1362470.0


def test_population_json_round_trip_and_older_files(tmp_path: Path):
    cfg = replace(SMALL, unverified_rate=0.05)
    assert PopulationConfig.from_json(cfg.to_json()) == cfg
    older = {k: v for k, v in asdict(SMALL).items()
             if k not in ("unverified_rate", "unbound_card_rate", "severe_default_rate")}
    back = PopulationConfig.from_json(json.dumps(older))
    assert back == SMALL
    assert back.severe_default_rate == 0.03


@pytest.mark.parametrize("name", ["unverified_rate", "unbound_card_rate", "severe_default_rate"])
@pytest.mark.parametrize("value", [-0.01, 0.6])
def test_bad_rates_name_the_field(name, value):
    with pytest.raises(ValueError, match=rf"{name}=.*\[0, 0.5\]"):
        PopulationConfig(**{name: value})


# ---- config ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(real=st.booleans(), card=st.booleans(), days=st.integers(0, 3650),
       spell=st.sampled_from(["native", "text"]))
def test_eligibility_keys_round_trip(real, card, days, spell):
    cfg = AuthorityConfig(eligibility=EligibilityConfig(real, card, days))
    flat = to_flat(cfg)
    assert {"eligibility.require_real_name", "eligibility.require_bound_card",
            "eligibility.severe_default_window_days"} <= set(flat)
    if spell == "text":  # as `--set` gives them
        flat = {k: str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, int)
                else v for k, v in flat.items() if k.startswith("eligibility.")}
    assert parse_flat(AuthorityConfig, flat).eligibility == cfg.eligibility


def test_eligibility_is_the_last_section():
    fields = list(AuthorityConfig.__dataclass_fields__)
    sections = [f for f in fields if f in ("model", "train", "split", "score", "psi", "privacy",
                                           "aggregation", "storage", "eligibility")]
    assert sections[-1] == "eligibility"


@settings(max_examples=30, deadline=None)
@given(days=st.one_of(st.integers(-10**6, -1), st.integers(3651, 10**6)))
def test_impossible_window_is_a_config_error_naming_the_key(days):
    with pytest.raises(ConfigError, match=r"eligibility\.severe_default_window_days=.*0\.\.3650"):
        parse_flat(AuthorityConfig, {"eligibility.severe_default_window_days": days})


@pytest.mark.parametrize(("key", "value"), [
    ("eligibility.require_real_name", "maybe"),
    ("eligibility.severe_default_window_days", "1.5"),
])
def test_wrong_types_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"{key}="):
        parse_flat(AuthorityConfig, {key: value})


# ---- the authority's loader --------------------------------------------------------------------


def _expected(pop: Population, cfg: EligibilityConfig, phones: pd.Series) -> pd.DataFrame:
    """assess() over the generator's table, rearranged by phone into the order of `phones`."""
    auth = pop.authority.set_index(normalize_phones(pop.authority[ID_COLUMN]))
    return assess(auth.loc[phones.to_numpy()].reset_index(drop=True), cfg)


def test_load_eligibility_follows_the_order_of_ids(small: Population, tmp_path: Path):
    root = tmp_path / "parties"
    write_parties(small, root)
    # Shuffle the authority's rows on disk: the loader must match people by identifier.
    path = root / AUTHORITY / "labels.parquet"
    pd.read_parquet(path).sample(frac=1.0, random_state=1).to_parquet(path, index=False)
    ids, labels = load_labels(root / AUTHORITY)
    cfg = EligibilityConfig()
    out = load_eligibility(root / AUTHORITY, None, cfg, ids)
    assert list(out.columns) == ["status", "reason", "reason_zh", "codes"]
    assert list(out.index) == list(range(len(ids)))
    pd.testing.assert_frame_equal(out, _expected(small, cfg, ids))
    # Any other order of the same people, and a subset.
    order = np.random.default_rng(2).permutation(len(ids))[:1000]
    subset = ids.iloc[order].reset_index(drop=True)
    pd.testing.assert_frame_equal(load_eligibility(root / AUTHORITY, None, cfg, subset),
                                  _expected(small, cfg, subset))
    # One read serves all three, in the table's order.
    ids2, labels2, elig = load_authority(root / AUTHORITY, None, cfg)
    pd.testing.assert_series_equal(ids2, ids)
    np.testing.assert_array_equal(labels2, labels)
    pd.testing.assert_frame_equal(elig, out)
    assert 0.05 < (out["status"] == INELIGIBLE).mean() < 0.15


def test_switches_and_window_change_the_outcome(small: Population, tmp_path: Path):
    write_parties(small, tmp_path)
    ids, _ = load_labels(tmp_path / AUTHORITY)
    on = load_eligibility(tmp_path / AUTHORITY, None, EligibilityConfig(), ids)
    off = load_eligibility(tmp_path / AUTHORITY, None,
                           EligibilityConfig(False, False, 0), ids)
    longer = load_eligibility(tmp_path / AUTHORITY, None,
                              EligibilityConfig(False, False, 3650), ids)
    assert (off["status"] != INELIGIBLE).all()
    assert (on["status"] == INELIGIBLE).sum() > 0
    days = small.authority[DEFAULT_DAYS]
    assert (longer["status"] == INELIGIBLE).sum() == int(days.notna().sum())


def test_encrypted_authority_table(small: Population, tmp_path: Path):
    store = Keystore.init(tmp_path / "keys")
    paths = write_parties(small, tmp_path / "enc", store=store)
    assert paths[AUTHORITY].name == "labels.parquet.enc"
    write_parties(small, tmp_path / "plain")
    enc = load_authority(tmp_path / "enc" / AUTHORITY, store, EligibilityConfig())
    plain = load_authority(tmp_path / "plain" / AUTHORITY, None, EligibilityConfig())
    pd.testing.assert_frame_equal(enc[2], plain[2])
    pd.testing.assert_series_equal(enc[0], plain[0])


def test_a_missing_column_names_itself_and_the_switch(small: Population, tmp_path: Path):
    write_parties(small, tmp_path)
    path = tmp_path / AUTHORITY / "labels.parquet"
    pd.read_parquet(path).drop(columns=[CARD]).to_parquet(path, index=False)
    ids, _ = load_labels(tmp_path / AUTHORITY)  # labels alone still load
    with pytest.raises(LabelDataError) as err:
        load_eligibility(tmp_path / AUTHORITY, None, EligibilityConfig(), ids)
    text = str(err.value)
    assert "card_bound" in text
    assert "eligibility.require_bound_card=false" in text
    assert "fedscore generate" in text
    assert "real_name_verified" not in text  # present columns are not blamed
    assert not any(phone in text for phone in ids.head(50))
    out = load_eligibility(tmp_path / AUTHORITY, None,
                           EligibilityConfig(require_bound_card=False), ids)
    assert len(out) == len(ids)


def test_unknown_people_and_bad_values_are_refused_without_identifiers(small: Population,
                                                                       tmp_path: Path):
    write_parties(small, tmp_path)
    ids, _ = load_labels(tmp_path / AUTHORITY)
    stranger = pd.Series(["+8619999999999"])
    with pytest.raises(LabelDataError, match="1 of 2 requested people") as err:
        load_eligibility(tmp_path / AUTHORITY, None, EligibilityConfig(),
                         pd.concat([ids.head(1), stranger], ignore_index=True))
    assert "+86" not in str(err.value)
    path = tmp_path / AUTHORITY / "labels.parquet"
    pd.read_parquet(path).assign(**{REAL_NAME: 2}).to_parquet(path, index=False)
    with pytest.raises(LabelDataError, match=r"real_name_verified.*1 = verified"):
        load_eligibility(tmp_path / AUTHORITY, None, EligibilityConfig(), ids)


def _real_parties(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    ids = [f"C{i:05d}" for i in range(200)]
    pd.DataFrame({"cid": ids, "bad": rng.integers(0, 2, 200)}).to_csv(data / "auth.csv",
                                                                       index=False)
    for name in ("s1", "s2"):
        pd.DataFrame({"cid": ids, name: rng.normal(size=200)}).to_csv(data / f"{name}.csv",
                                                                      index=False)
    mapping = {"identifier": "cid", "authority": {"file": "auth.csv", "label": "bad"},
               "silos": {"one": {"file": "s1.csv", "columns": ["s1"]},
                         "two": {"file": "s2.csv", "columns": ["s2"]}}}
    (data / "mapping.json").write_text(json.dumps(mapping))
    parties = tmp_path / "parties"
    import_parties(read_mapping(data), parties)
    return parties


def test_real_data_switches_unsupported_conditions_off(tmp_path: Path, caplog):
    parties = _real_parties(tmp_path)
    schema = json.loads((parties / AUTHORITY / "schema.json").read_text())
    assert schema["eligibility_columns"] == []
    with caplog.at_level(logging.INFO, logger="server.labels"):
        ids, _labels, elig = load_authority(parties / AUTHORITY, None, EligibilityConfig())
    assert len(elig) == len(ids) == 200
    assert (elig["status"] != INELIGIBLE).all()
    messages = " ".join(r.getMessage() for r in caplog.records)
    for switch in ("require_real_name", "require_bound_card", "severe_default_window_days"):
        assert f"{switch} off" in messages
    # A schema that declares a column the table lacks is an error, not a silent switch-off.
    schema["eligibility_columns"] = [REAL_NAME]
    (parties / AUTHORITY / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(LabelDataError, match=r"real_name_verified.*require_real_name=false"):
        load_authority(parties / AUTHORITY, None, EligibilityConfig())
    schema["eligibility_columns"] = "real_name_verified"
    (parties / AUTHORITY / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(LabelDataError, match="must be a list"):
        load_labels(parties / AUTHORITY)
