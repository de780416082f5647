"""The audit log: round trips, every kind of tampering found and named, no plaintext on disk."""

from __future__ import annotations

import base64
import json
import logging
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.at_rest import Keystore
from server.audit_log import (
    AuditLog,
    AuditLogError,
    chain_hash,
    genesis_hash,
)

CANARY = "CANARY-5f1c-不可泄露"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Keystore:
    return Keystore.init(tmp_path_factory.mktemp("ks") / "keys")


def _dispute(i: int) -> dict:
    return {"subject_ref": f"ref-{i:04d}", "silo": "payments", "field": "overdue_count",
            "old_score": 540 + i, "new_score": 600 + i, "category": "transaction",
            "due_hours": 24, "note": CANARY}


def _log_with(tmp_path: Path, store: Keystore, n: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.log", store)
    for i in range(n):
        log.append(_dispute(i))
    return log


def _lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def _write(log: AuditLog, lines: list[bytes]) -> None:
    log.path.write_bytes(b"".join(lines))


# ---- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("suite", ["aes-256-gcm", "sm4-gcm"])
def test_round_trip(tmp_path, suite):
    store = Keystore.init(tmp_path / "keys", suite)
    log = AuditLog(tmp_path / "audit.log", store)
    written = [log.append(_dispute(i)) for i in range(3)]
    assert [e.seq for e in written] == [0, 1, 2]
    assert written[0].prev_hash == genesis_hash("audit.log")
    assert [e.prev_hash for e in written[1:]] == [e.hash for e in written[:-1]]
    assert log.entries() == [_dispute(i) for i in range(3)]
    result = log.verify()
    assert result.ok
    assert result.entries == 3
    assert result.first_bad is None
    assert result.head == written[-1].hash
    assert log.verify(expect_head=written[-1].hash)


def test_a_reopened_log_continues_the_chain(tmp_path, store):
    first = _log_with(tmp_path, store, 2)
    entry = AuditLog(first.path, store).append({"n": 2})
    assert entry.seq == 2
    assert AuditLog(first.path, store).verify().entries == 3


def test_the_file_is_private_and_one_line_per_entry(tmp_path, store):
    log = _log_with(tmp_path, store, 3)
    assert log.path.stat().st_mode & 0o077 == 0
    lines = _lines(log)
    assert len(lines) == 3
    assert all(line.endswith(b"\n") for line in lines)
    assert sorted(json.loads(lines[0])) == ["ct", "hash", "prev", "seq"]


def test_a_link_planted_at_the_log_is_refused_and_nothing_is_anchored(tmp_path, store):
    """Someone who can write the run directory plants a link where the log goes: the append
    neither writes through it nor moves the anchor."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs\n")
    (tmp_path / "audit.log").symlink_to(victim)
    log = AuditLog(tmp_path / "audit.log", store, log_name="planted-link")
    with pytest.raises(PermissionError, match="symbolic link"):
        log.append(_dispute(0))
    assert victim.read_bytes() == b"theirs\n"
    assert not log.anchor_path.exists()


def test_a_link_planted_at_the_anchor_is_refused_not_read(tmp_path, store):
    """The anchor vouches for the log: one that is a link (to a forged anchor, say) is
    refused like any private file that is not the file itself."""
    log = AuditLog(tmp_path / "audit.log", store, log_name="planted-anchor")
    log.append(_dispute(0))
    forged = tmp_path / "forged.json"
    forged.write_bytes(log.anchor_path.read_bytes())
    log.anchor_path.unlink()
    log.anchor_path.symlink_to(forged)
    with pytest.raises(AuditLogError, match="symbolic link"):
        log.append(_dispute(1))
    assert forged.read_bytes() == log.anchor_path.read_bytes()
    assert AuditLog(log.path, store, log_name="planted-anchor").verify().entries == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=15,
)
records = st.dictionaries(st.text(max_size=12), json_values, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, min_size=1, max_size=5))
def test_any_json_records_round_trip(store, batch):
    with tempfile.TemporaryDirectory() as tmp:
        log = AuditLog(Path(tmp) / "audit.log", store)
        for record in batch:
            log.append(record)
        assert log.entries() == batch
        assert log.verify().entries == len(batch)


@pytest.mark.parametrize(
    ("record", "match"),
    [({1: "x"}, "read back unchanged"), ({"t": (1, 2)}, "read back unchanged"),
     ({"x": float("nan")}, "NaN or infinity"), ({"x": object()}, "JSON cannot hold"),
     (["not", "a", "mapping"], "mapping")],
)
def test_records_json_would_change_are_refused(tmp_path, store, record, match):
    log = AuditLog(tmp_path / "audit.log", store)
    with pytest.raises(AuditLogError, match=match):
        log.append(record)
    assert not log.path.exists()


def test_concurrent_writers_do_not_fork_the_chain(tmp_path, store):
    path = tmp_path / "audit.log"

    def writer(k: int) -> None:
        log = AuditLog(path, store)  # each thread its own file handle, as processes would have
        for i in range(15):
            log.append({"writer": k, "i": i})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = AuditLog(path, store).verify()
    assert result.ok
    assert result.entries == 30


# ---- tampering ----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(entry=st.integers(0, 3), where=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_any_flipped_bit_is_found_at_its_entry(store, entry, where, bit):
    with tempfile.TemporaryDirectory() as tmp:
        _flip_and_check(_log_with(Path(tmp), store), entry, where, bit)


def _flip_and_check(log: AuditLog, entry: int, where: int, bit: int) -> None:
    lines = _lines(log)
    line = bytearray(lines[entry])
    pos = where % (len(line) - 1)  # any byte but the line end
    line[pos] ^= 1 << bit
    lines[entry] = bytes(line)
    _write(log, lines)
    result = log.verify()
    assert not result.ok
    assert result.first_bad == entry
    assert result.entries == entry
    assert result.reason.startswith(f"entry {entry}:")
    with pytest.raises(AuditLogError, match=f"entry {entry}:"):
        log.entries()


@pytest.mark.parametrize("deleted", [0, 1, 2])
def test_a_deleted_line_is_found(tmp_path, store, deleted):
    log = _log_with(tmp_path, store)
    lines = _lines(log)
    del lines[deleted]
    _write(log, lines)
    result = log.verify()
    assert not result.ok
    assert result.first_bad == deleted
    assert result.reason.startswith(f"entry {deleted}:")
    assert "deleted" in result.reason


def test_cutting_the_end_needs_the_recorded_head(tmp_path, store):
    log = _log_with(tmp_path, store)
    head = log.verify().head
    _write(log, _lines(log)[:-1])
    # No chain can tell a shortened log from a shorter one; the head recorded elsewhere can.
    assert log.verify().ok
    result = log.verify(expect_head=head)
    assert not result.ok
    assert result.first_bad == 3
    assert result.reason.startswith("entry 3: missing")


def test_a_reordered_pair_is_found(tmp_path, store):
    log = _log_with(tmp_path, store)
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    result = log.verify()
    assert not result.ok
    assert result.first_bad == 1
    assert result.reason == ("entry 1: carries sequence number 2 (entries were deleted, "
                             "inserted or reordered)")


def test_a_truncated_last_line_is_found_and_blocks_appends(tmp_path, store):
    log = _log_with(tmp_path, store)
    data = log.path.read_bytes()
    log.path.write_bytes(data[: len(data) - 40])
    result = log.verify()
    assert not result.ok
    assert result.first_bad == 3
    assert result.entries == 3
    assert result.reason.startswith("entry 3: truncated last line")
    with pytest.raises(AuditLogError, match="last line is incomplete"):
        log.append({"n": 4})


def test_a_wrong_keystore_is_named(tmp_path, store):
    log = _log_with(tmp_path, store)
    other = Keystore.init(tmp_path / "other-keys")
    result = AuditLog(log.path, other).verify()
    assert not result.ok
    assert result.first_bad == 0
    assert result.reason.startswith("entry 0: cannot be decrypted")
    assert "does not hold" in result.reason
    with pytest.raises(AuditLogError, match="cannot be decrypted"):
        AuditLog(log.path, other).append({"n": 4})


def test_a_log_cannot_pass_as_another_logs(tmp_path, store):
    log = _log_with(tmp_path, store)
    result = AuditLog(log.path, store, log_name="run-2/audit").verify()
    assert not result.ok
    assert result.first_bad == 0


def test_a_rewritten_entry_with_recomputed_hashes_fails_authentication(tmp_path, store):
    # What an attacker without the key can do at best: change a ciphertext and recompute every
    # hash after it. The chain then holds together, but GCM's tag does not.
    log = _log_with(tmp_path, store)
    lines = [json.loads(line) for line in _lines(log)]
    ct = bytearray(base64.b64decode(lines[1]["ct"]))
    ct[-20] ^= 0x01
    lines[1]["ct"] = base64.b64encode(bytes(ct)).decode()
    for i in range(1, len(lines)):
        lines[i]["prev"] = lines[i - 1]["hash"]
        lines[i]["hash"] = chain_hash(lines[i]["prev"], i, base64.b64decode(lines[i]["ct"]))
    _write(log, [json.dumps(o, sort_keys=True, separators=(",", ":")).encode() + b"\n"
                 for o in lines])
    result = log.verify()
    assert not result.ok
    assert result.first_bad == 1
    assert result.reason.startswith("entry 1: cannot be decrypted and authenticated")


def test_a_missing_log_is_named(tmp_path, store):
    with pytest.raises(AuditLogError, match="no audit log"):
        AuditLog(tmp_path / "nope.log", store).verify()


# ---- nothing leaks --------------------------------------------------------------------------

def test_no_plaintext_on_disk_or_in_the_logs(tmp_path, store, caplog):
    caplog.set_level(logging.DEBUG)
    log = _log_with(tmp_path, store)
    log.verify()
    raw = log.path.read_bytes()
    for secret in (CANARY, "ref-0001", "overdue_count", "transaction", "old_score"):
        assert secret.encode() not in raw
        assert secret not in caplog.text
    key_material = next((store.path).glob("key-*.bin")).read_bytes()
    assert key_material.hex() not in caplog.text
    assert key_material not in raw
