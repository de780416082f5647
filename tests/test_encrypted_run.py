"""A run with a keystore: person-level files are encrypted, bound to the run, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crypto.at_rest import MAGIC, AtRestError, Keystore
from crypto.identity import keyed_refs
from server.labels import load_labels
from server.scores_file import read_scores
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_encrypted_outputs_and_checkpoints(interrupted_runs: dict[str, Path],
                                           tmp_path: Path):
    """A keystore of the national-standard suite (SM4-GCM, HMAC-SM3 references; every other
    run in the suite uses the default AES-256-GCM keystore), through a stop and a resume:
    conftest's interrupted_runs (stopped at round 3 by a faulty silo, its authority's round-2
    checkpoint kept as the stop left it)."""
    keys, run = interrupted_runs["keys"], interrupted_runs["crashed"]
    assert json.loads((keys / "keystore.json").read_text())["suite"] == "sm4-gcm"
    for name in ("run.npz", "authority.npz"):
        assert (interrupted_runs["stopped_checkpoint"] / name).read_bytes().startswith(MAGIC)

    assert not (run / "scores.parquet").exists()
    parties = Path(f"{run}.parties")
    _assert_parties_encrypted(parties)
    scores = read_scores(run, str(keys))
    assert len(scores) > 1000
    assert scores["score"].between(300, 850).all()

    authority = json.loads((run / "authority.json").read_text())
    assert authority["resumed"] is True
    assert authority["subject_ref"] == "hmac-sm3"
    ids, _ = load_labels(parties / "authority", Keystore(keys))
    pepper = (parties / "authority" / "pepper.key").read_bytes()
    assert set(scores["subject_ref"]) <= set(keyed_refs(ids.to_numpy(), pepper, "sm3"))
    assert set(scores["subject_ref"]).isdisjoint(keyed_refs(ids.to_numpy(), pepper, "sha256"))

    other = tmp_path / "other-keys"
    assert run_cli("keys", "init", str(other), "--suite", "sm4-gcm",
                   cwd=tmp_path).returncode == 0
    # Another keystore holds no record of this run (scores bound to the authority's record).
    with pytest.raises(AtRestError, match="has no record of a run"):
        read_scores(run, str(other))
    # The run is shared with other modules: its scores are put back as they were.
    original = (run / "scores.parquet.enc").read_bytes()
    blob = bytearray(original)
    blob[-5] ^= 0x01
    (run / "scores.parquet.enc").write_bytes(bytes(blob))
    try:
        with pytest.raises(AtRestError, match="authentication failed"):
            read_scores(run, str(keys))
    finally:
        (run / "scores.parquet.enc").write_bytes(original)


def test_a_missing_keystore_stops_before_the_engine(tmp_path: Path):
    proc = run_cli("run", "--out", str(tmp_path / "run"), "--users", "2000",
                   "--set", f"storage.keystore={tmp_path / 'absent'}", cwd=tmp_path,
                   engine=False)
    assert proc.returncode == 2
    assert "fedscore keys init" in proc.stderr
    assert "Start engine" not in proc.stderr


def _assert_parties_encrypted(parties: Path) -> None:
    """Party tables and every silo's checkpoint files rest encrypted; no plaintext twin."""
    tables = {"authority": "labels.parquet", "payments": "features.parquet",
              "social": "features.parquet", "device": "features.parquet",
              "simulation": "truth.parquet"}
    for party, name in tables.items():
        assert (parties / party / f"{name}.enc").read_bytes().startswith(MAGIC)
        assert not (parties / party / name).exists()
    for silo in ("payments", "social", "device"):
        # Beside the run's checkpoint folder: the silo's PSI step markers (psi-<run id>.blind,
        # .finish; empty files, they record that the run took each step once).
        entries = list((parties / silo / "checkpoints").iterdir())
        (checkpoints,) = [p for p in entries if p.is_dir()]
        markers = {p.name for p in entries if not p.is_dir()}
        assert markers
        assert all(n.startswith("psi-") and n.endswith((".blind", ".finish"))
                   for n in markers), markers
        assert all((parties / silo / "checkpoints" / n).stat().st_size == 0 for n in markers)
        names = {p.name for p in checkpoints.iterdir()}
        assert {"alignment.npy.enc", "mask.key.enc"} <= names
        assert any(n.startswith("round-") and n.endswith(".pt.enc") for n in names)
        assert not names & {"alignment.npy", "mask.key"}
        assert not [n for n in names if n.endswith(".pt")]
        # The answer journals (answers-<key tag>.log) hold only kinds, rounds and SHA-256
        # digests of messages and replies, no person-level value: they rest in plaintext.
        journals = {n for n in names if n.startswith("answers-") and n.endswith(".log")}
        for name in journals:
            for line in (checkpoints / name).read_text().splitlines():
                kind, _, message, reply = line.split()
                assert len(message) == len(reply) == 64, kind
        for name in names - {"model.json", "peers.json"} - journals:
            assert (checkpoints / name).read_bytes().startswith(MAGIC), name
