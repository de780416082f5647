"""Real data: the UCI credit-card table split into silos, and one CSV per party with a mapping."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.protocol.schema import federation_silos
from clients.silo.data import load_silo
from server.labels import load_labels
from simulations.data.real_data import (
    UCI_SILOS,
    DataImportError,
    import_parties,
    read_mapping,
    uci_default_path,
    uci_mapping,
)
from tests import background
from tests.conftest import scores_of

UCI = uci_default_path()
needs_uci = pytest.mark.skipif(not UCI.exists(), reason="../shared/data is not beside the repo")


def _small_uci(tmp_path: Path, rows: int = 3000) -> Path:
    path = tmp_path / "uci_small.csv"
    pd.read_csv(UCI, nrows=rows).to_csv(path, index=False)
    return path


@needs_uci
def test_uci_splits_into_the_readme_silos(tmp_path: Path):
    source = _small_uci(tmp_path, 500)
    parties = tmp_path / "parties"
    assert import_parties(uci_mapping(source), parties) is False
    assert federation_silos(parties) == tuple(UCI_SILOS)
    ids, labels = load_labels(parties / "authority")
    assert len(ids) == 500
    assert set(np.unique(labels)) <= {0, 1}
    for silo, columns in UCI_SILOS.items():
        matrix = load_silo(parties / silo, silo)
        # Codes become one-hot columns "PAY_0=-1", ...; every source column is represented.
        assert {c.split("=")[0].removesuffix("__missing") for c in matrix.columns} == set(columns)
        assert np.isfinite(matrix.x).all()
    # The same source again is reused; the folder is never rewritten from other data.
    assert import_parties(uci_mapping(source), parties) is True
    other = tmp_path / "other.csv"
    pd.read_csv(source).iloc[:400].to_csv(other, index=False)
    with pytest.raises(DataImportError, match="other data"):
        import_parties(uci_mapping(other), parties)


def _party_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    ids = [f"C{i:05d}" for i in range(300)]
    pd.DataFrame({"cid": ids, "bad": rng.integers(0, 2, 300)}).to_csv(data / "auth.csv",
                                                                       index=False)
    pd.DataFrame({"cid": ids[:250], "a": rng.normal(size=250)}).to_csv(data / "s1.csv",
                                                                        index=False)
    pd.DataFrame({"cid": ids[50:], "b": rng.normal(size=250), "c": rng.normal(size=250)}
                 ).to_csv(data / "s2.csv", index=False)
    mapping = {"identifier": "cid", "authority": {"file": "auth.csv", "label": "bad"},
               "silos": {"one": {"file": "s1.csv", "columns": ["a"]},
                         "two": {"file": "s2.csv", "columns": ["b", "c"]}}}
    (data / "mapping.json").write_text(json.dumps(mapping))
    return data


def test_a_directory_of_party_csvs_imports(tmp_path: Path):
    data = _party_dir(tmp_path)
    parties = tmp_path / "parties"
    import_parties(read_mapping(data), parties)
    assert federation_silos(parties) == ("one", "two")
    assert len(load_silo(parties / "two", "two").x) == 250


@pytest.mark.parametrize(("change", "problem"), [
    (lambda d: (d / "s2.csv").unlink(), "s2.csv does not exist"),
    (lambda d: (d / "mapping.json").unlink(), "has no mapping.json"),
    (lambda d: pd.read_csv(d / "s1.csv").drop(columns="a").to_csv(d / "s1.csv", index=False),
     "no such column"),
    (lambda d: pd.read_csv(d / "auth.csv").assign(bad=2).to_csv(d / "auth.csv", index=False),
     "are not 0 or 1"),
    (lambda d: pd.read_csv(d / "s1.csv").assign(a=lambda t: t["a"].astype(object).where(
        t.index >= 3, "x")).to_csv(d / "s1.csv", index=False),  # 3 words among numbers
     "not numeric: 3 of 250 cells are text among 247 numbers"),
    (lambda d: (d / "mapping.json").write_text("{not json"), "not a valid mapping"),
])
def test_bad_data_directories_are_refused_and_nothing_is_written(tmp_path, change, problem):
    data = _party_dir(tmp_path)
    change(data)
    parties = tmp_path / "parties"
    with pytest.raises(DataImportError, match=problem):
        import_parties(read_mapping(data), parties)
    assert not parties.exists() or not any(parties.iterdir())


def _uci_run_commands(work: Path) -> list[background.Command]:
    return [background.Command(
        ("run", "--data", str(work / "uci_small.csv"), "--out", str(work / "run"),
         "--set", "train.epochs=1", "--set", "train.batch_size=512",
         "--set", "privacy.epsilon=inf", "--set", "privacy.label_epsilon=inf"),
        before=_small_uci)]


if UCI.exists():  # the run starts when collection ends, in the background
    background.register("uci_run", _uci_run_commands)


@pytest.fixture
def uci_run(background_runs) -> tuple[Path, subprocess.CompletedProcess]:
    (proc,), work = background_runs("uci_run")
    return work, proc


@needs_uci
@pytest.mark.slow
def test_uci_run_end_to_end(uci_run):
    """The same pipeline on real data, PSI included; no oracle without a truth table."""
    tmp_path, proc = uci_run
    source = tmp_path / "uci_small.csv"
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["oracle_auc"] is None
    assert metrics["people"]["aligned"] == 3000
    assert set(metrics["people"]["silo_rows"]) == set(UCI_SILOS)
    assert metrics["auc"] > 0.6
    assert metrics["all_test_auc"] == pytest.approx(metrics["baseline_central_auc"], abs=0.03)
    assert metrics["baseline_best_silo"] == "payments"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(source)
    scores = scores_of(tmp_path / "run")
    assert scores["subject_ref"].str.fullmatch(r"[0-9a-f]{32}").all()  # keyed refs, not IDs
