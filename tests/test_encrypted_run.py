"""A run with a keystore: person-level files are encrypted, bound to the run, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto.at_rest import MAGIC, AtRestError
from server.authority import read_scores
from tests.conftest import run_cli, run_cli_crashing

pytestmark = pytest.mark.slow


def test_encrypted_outputs_and_checkpoints(tmp_path: Path):
    keys, run = tmp_path / "keys", tmp_path / "run"
    assert run_cli("keys", "init", str(keys), cwd=tmp_path).returncode == 0
    args = ("--users", "2000", "--seed", "4", "--set", "train.epochs=2",
            "--set", "train.batch_size=256", "--set", f"storage.keystore={keys}")
    run_cli_crashing(2, "run", "--out", str(run), *args, cwd=tmp_path)
    for name in ("run.npz", "authority.npz"):
        assert (run / "checkpoint" / name).read_bytes().startswith(MAGIC)
    resumed = run_cli("run", "--resume", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    assert not (run / "scores.parquet").exists()
    scores = read_scores(run, str(keys))
    assert len(scores) > 1000
    assert scores["score"].between(300, 850).all()

    other = tmp_path / "other-keys"
    assert run_cli("keys", "init", str(other), cwd=tmp_path).returncode == 0
    with pytest.raises(AtRestError, match="does not hold"):
        read_scores(run, str(other))
    blob = bytearray((run / "scores.parquet.enc").read_bytes())
    blob[-5] ^= 0x01
    (run / "scores.parquet.enc").write_bytes(bytes(blob))
    with pytest.raises(AtRestError, match="authentication failed"):
        read_scores(run, str(keys))


def test_a_missing_keystore_stops_before_the_engine(tmp_path: Path):
    proc = run_cli("run", "--out", str(tmp_path / "run"), "--users", "2000",
                   "--set", f"storage.keystore={tmp_path / 'absent'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "fedscore keys init" in proc.stderr
    assert "Start engine" not in proc.stderr
