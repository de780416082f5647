"""A silo's dispute corrections: checked values, kept encrypted beside the table, applied to
the corrected person's row only; and the serve client when nobody serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clients.protocol.tables import SiloDataError
from clients.silo import corrections
from clients.silo.data import load_silo
from crypto.at_rest import Keystore
from simulations.data.population import PopulationConfig, generate, write_parties
from simulations.service.channel import request


@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Keystore]:
    root = tmp_path_factory.mktemp("corr")
    store = Keystore.init(root / "keys")
    write_parties(generate(PopulationConfig(users=1000, seed=3)), root / "parties", store=store)
    return root / "parties", store


FEATURES = ["on_time_repayment_rate", "overdue_count", "balance"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("overdue_count", -1, "cannot be negative"),
    ("overdue_count", 1.5, "whole number"),
    ("on_time_repayment_rate", 1.2, "lies in 0..1"),
    ("balance", float("nan"), "finite"),
    ("favourite_colour", 1, "correctable fields: on_time_repayment_rate"),
])
def test_impossible_values_are_refused_with_the_reason(field, value, message):
    with pytest.raises(SiloDataError, match=message):
        corrections.check_value("payments", field, value, FEATURES)


def test_a_text_field_or_a_word_is_refused_before_anything_is_recorded():
    fields = [*FEATURES, "employment"]
    with pytest.raises(SiloDataError, match="employment holds text categories"):
        corrections.check_value("payments", "employment", "salaried", fields, ["employment"])
    with pytest.raises(SiloDataError, match="balance: give a number"):
        corrections.check_value("payments", "balance", "lots", fields, ["employment"])


def test_a_correction_changes_that_persons_row_only(parties):
    root, store = parties
    silo_dir = root / "payments"
    base = load_silo(silo_dir, "payments", store)
    col = base.columns.index("overdue_count")
    row = int(np.flatnonzero(base.x[:, col] > base.x[:, col].min())[0])  # has overdue events
    person = str(base.ids.iloc[row])
    target = 0.0
    corrections.record(silo_dir, "payments", store, person, "overdue_count", target,
                       "transaction")
    items = corrections.load(silo_dir, "payments", store)
    fixed = corrections.apply(base, silo_dir, "payments", store, items)
    changed = np.flatnonzero((fixed.x != base.x).any(axis=1))
    assert changed.tolist() == [row]
    assert fixed.x[row, col] != base.x[row, col]
    # The same value prepared with the table's own statistics: a person who already has it.
    same = np.flatnonzero(np.isclose(base.x[:, col], fixed.x[row, col]))
    assert len(same) > 0
    # Kept encrypted: neither the identifier nor the field name is readable on disk.
    raw = (silo_dir / "corrections.json.enc").read_bytes()
    assert person.encode() not in raw
    assert b"overdue_count" not in raw
    # A later correction of the same field wins.
    corrections.record(silo_dir, "payments", store, person, "overdue_count", 3.0, "transaction")
    again = corrections.apply(base, silo_dir, "payments", store,
                              corrections.load(silo_dir, "payments", store))
    assert again.x[row, col] != fixed.x[row, col]


def test_nobody_serving_means_no_answer(tmp_path: Path):
    assert request(tmp_path, {"op": "score"}) is None
    (tmp_path / "serve.json").write_text(json.dumps({"socket": str(tmp_path / "gone.sock")}))
    assert request(tmp_path, {"op": "score"}) is None
    assert not (tmp_path / "serve.json").exists()  # the stale file is cleared
