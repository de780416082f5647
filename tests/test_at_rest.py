"""Encryption at rest: round trips, tampering, wrong keys and contexts, keystore hygiene."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.at_rest import (
    HEADER,
    AtRestError,
    Keystore,
    decrypt,
    encrypt,
    keystore_path,
    open_keystore,
    read_encrypted,
    write_encrypted,
)

SUITES = ["aes-256-gcm", "sm4-gcm"]


@pytest.fixture(params=SUITES)
def store(request, tmp_path) -> Keystore:
    return Keystore.init(tmp_path / "keys", request.param)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), context=st.binary(max_size=64))
def test_round_trip(store, data, context):
    assert decrypt(store, encrypt(store, data, context), context) == data


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=512), where=st.integers(0, 10**6),
       bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(store, data, where, bit):
    blob = bytearray(encrypt(store, data, b"run-1/payments"))
    blob[where % len(blob)] ^= 1 << bit
    with pytest.raises(AtRestError):
        decrypt(store, bytes(blob), b"run-1/payments")


def test_a_file_cannot_move_to_another_run_or_party(store):
    blob = encrypt(store, b"scores", b"run-1/authority/scores")
    with pytest.raises(AtRestError, match="another run or party"):
        decrypt(store, blob, b"run-2/authority/scores")


def test_a_wrong_keystore_is_named(store, tmp_path):
    other = Keystore.init(tmp_path / "other", store.suite)
    blob = encrypt(store, b"x", b"c")
    with pytest.raises(AtRestError, match="does not hold"):
        decrypt(other, blob, b"c")


def test_rotation_keeps_old_files_readable(store):
    old = encrypt(store, b"before", b"c")
    store.rotate()
    new = encrypt(store, b"after", b"c")
    assert old[7:15] != new[7:15]  # different key ids in the headers
    assert decrypt(store, old, b"c") == b"before"
    assert decrypt(Keystore(store.path), new, b"c") == b"after"


def test_key_files_are_private_and_world_readable_ones_refused(store):
    for f in store.path.glob("key-*.bin"):
        assert oct(f.stat().st_mode & 0o777) == "0o600"
    blob = encrypt(store, b"x", b"c")
    next(store.path.glob("key-*.bin")).chmod(0o644)
    with pytest.raises(AtRestError, match="chmod 600"):
        decrypt(Keystore(store.path), blob, b"c")


def test_missing_keystore_and_truncated_file(tmp_path):
    with pytest.raises(AtRestError, match="fedscore keys init"):
        Keystore(tmp_path / "nowhere")
    store = Keystore.init(tmp_path / "k")
    with pytest.raises(AtRestError, match="truncated"):
        decrypt(store, encrypt(store, b"abc", b"c")[: HEADER - 1], b"c")


def test_writes_are_atomic_and_leave_no_partial_file(store, tmp_path):
    target = tmp_path / "scores.enc"
    write_encrypted(store, target, b"data" * 1000, b"c")
    assert read_encrypted(store, target, b"c") == b"data" * 1000
    assert not list(tmp_path.glob("*.partial"))


def test_init_refuses_a_used_directory_and_unknown_suites(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(AtRestError, match="not empty"):
        Keystore.init(tmp_path / "used")
    with pytest.raises(AtRestError, match="unknown suite"):
        Keystore.init(tmp_path / "new", "des")


def test_keys_never_show_in_reprs(store):
    key = store.active()
    assert key.material.hex() not in repr(key)


@pytest.mark.slow
def test_keys_cli(tmp_path):
    from tests.conftest import run_cli

    made = run_cli("keys", "init", str(tmp_path / "ks"), "--suite", "sm4-gcm", cwd=tmp_path)
    assert made.returncode == 0
    assert "sm4-gcm" in made.stdout
    first = Keystore(tmp_path / "ks").active().key_id
    assert run_cli("keys", "rotate", str(tmp_path / "ks"), cwd=tmp_path).returncode == 0
    assert Keystore(tmp_path / "ks").active().key_id != first
    again = run_cli("keys", "init", str(tmp_path / "ks"), cwd=tmp_path)
    assert again.returncode == 2
    assert "not empty" in again.stderr
    missing = run_cli("keys", "rotate", str(tmp_path / "none"), cwd=tmp_path)
    assert missing.returncode == 2
    assert "fedscore keys init" in missing.stderr


def test_auto_keystore_sits_beside_the_parties_and_is_made_once(tmp_path):
    parties = tmp_path / "runs" / "a.parties"
    assert keystore_path("auto", parties) == tmp_path / "runs" / "a.parties.keys"
    assert keystore_path("none", parties) is None
    first = open_keystore("auto", parties)
    again = open_keystore("auto", parties)
    assert first.active().key_id == again.active().key_id
    assert oct(first.path.stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in first.path.parent.iterdir()] == ["a.parties.keys"]  # no leftovers


def test_parties_starting_together_share_one_keystore(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "shared.keys"
    with ThreadPoolExecutor(8) as pool:
        stores = list(pool.map(lambda _: Keystore.open_or_init(path), range(8)))
    assert len({s.active().key_id for s in stores}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.keys"]


def test_an_explicit_keystore_is_never_created_silently(tmp_path):
    with pytest.raises(AtRestError, match="fedscore keys init"):
        open_keystore(str(tmp_path / "typo"), tmp_path / "parties")


def test_empty_keystore_setting_is_refused():
    from server.config import AuthorityConfig, ConfigError
    from server.config_keys import parse_flat

    with pytest.raises(ConfigError, match='"auto", "none"'):
        parse_flat(AuthorityConfig, {"storage.keystore": ""})
