"""crypto/private_files.py, the one writer and checker of private files: atomic replacement
that no planted link redirects, an append-only private file, one permission check for every
secret's reader, one creator of 0700 directories. Attacks first, then properties."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.at_rest import AtRestError, Keystore
from crypto.identity import load_or_create_pepper
from crypto.private_files import (
    PrivateDirError,
    PrivateFileError,
    check_private,
    ensure_private_dir,
    open_append,
    write_atomic,
)
from crypto.tls import CredentialError, write_credentials


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---- write_atomic: attacks ----------------------------------------------------------------------


def test_write_atomic_replaces_a_planted_link_instead_of_writing_through_it(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs")
    (tmp_path / "anchor.json").symlink_to(victim)
    write_atomic(tmp_path / "anchor.json", b"ours")
    assert victim.read_bytes() == b"theirs"
    assert not (tmp_path / "anchor.json").is_symlink()
    assert (tmp_path / "anchor.json").read_bytes() == b"ours"
    assert _mode(tmp_path / "anchor.json") == 0o600


def test_write_atomic_ignores_links_at_the_old_predictable_temporary_names(tmp_path: Path):
    """The writers it replaced used `.NAME.PID.tmp` and `NAME.partial`: links planted there in
    advance must receive nothing."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs")
    for name in (f".phases.json.{os.getpid()}.tmp", "phases.json.partial", "phases.json.tmp"):
        (tmp_path / name).symlink_to(victim)
    write_atomic(tmp_path / "phases.json", "{}\n", public=True)
    assert victim.read_bytes() == b"theirs"
    assert (tmp_path / "phases.json").read_text() == "{}\n"


def test_a_failed_write_atomic_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                         monkeypatch):
    path = tmp_path / "keys.json"
    write_atomic(path, b"old")

    def crash(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


# ---- open_append: attacks --------------------------------------------------------------------


def test_append_refuses_a_planted_link_even_a_dangling_one(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs")
    (tmp_path / "live.log").symlink_to(victim)
    (tmp_path / "dangling.log").symlink_to(tmp_path / "nowhere")
    for name in ("live.log", "dangling.log"):
        with pytest.raises(PrivateFileError, match="symbolic link"), \
                open_append(tmp_path / name, "audit log") as fh:
            fh.write(b"ours")
    assert victim.read_bytes() == b"theirs"
    assert not (tmp_path / "nowhere").exists()


def test_append_refuses_a_file_open_to_others_or_someone_elses(tmp_path: Path, monkeypatch):
    path = tmp_path / "audit.log"
    path.write_bytes(b"line\n")
    path.chmod(0o644)
    with pytest.raises(PrivateFileError, match="chmod 600"), open_append(path, "audit log"):
        pass
    path.chmod(0o600)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(PrivateFileError, match="belongs to another user"), \
            open_append(path, "audit log"):
        pass
    assert path.read_bytes() == b"line\n"


def test_append_creates_0600_and_appends(tmp_path: Path):
    path = tmp_path / "audit.log"
    for line in (b"a\n", b"b\n"):
        with open_append(path, "audit log") as fh:
            fh.write(line)
    assert path.read_bytes() == b"a\nb\n"
    assert _mode(path) == 0o600


# ---- one permission check for every reader of a secret ----------------------------------------


def _tls_key(tmp_path: Path) -> tuple[Path, object]:
    creds = write_credentials(tmp_path / "creds", ["127.0.0.1"], ["payments"])
    return creds.node_key("payments"), lambda: creds.check(["payments"])


def _keystore_key(tmp_path: Path) -> tuple[Path, object]:
    store = Keystore.init(tmp_path / "keys")
    key_id = store.active().key_id
    return store.path / f"key-{key_id.hex()}.bin", lambda: Keystore(store.path).key(key_id)


def _pepper(tmp_path: Path) -> tuple[Path, object]:
    path = tmp_path / "pepper.bin"
    load_or_create_pepper(path)
    return path, lambda: load_or_create_pepper(path)


READERS = {"tls": (_tls_key, CredentialError), "keystore": (_keystore_key, AtRestError),
           "pepper": (_pepper, PermissionError)}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_of_a_secret_refuses_the_same_things(tmp_path: Path, reader: str,
                                                           monkeypatch):
    make, error = READERS[reader]
    path, read = make(tmp_path)
    read()  # as made: accepted
    path.chmod(0o640)
    with pytest.raises(error, match=r"readable by other users \(mode 640\).*chmod 600"):
        read()
    path.chmod(0o600)
    real = path.with_name(path.name + ".real")
    path.rename(real)
    path.symlink_to(real)
    with pytest.raises(error, match="symbolic link"):
        read()
    path.unlink()
    real.rename(path)
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    with pytest.raises(error, match="belongs to another user"):
        read()


def test_a_symlinked_keystore_directory_is_refused(tmp_path: Path):
    store = Keystore.init(tmp_path / "keys")
    (tmp_path / "link").symlink_to(store.path)
    with pytest.raises(AtRestError, match="symbolic link"):
        Keystore(tmp_path / "link")


def test_check_private_names_what_is_not_a_file(tmp_path: Path):
    with pytest.raises(PrivateFileError, match="not a regular file"):
        check_private(tmp_path, "key file")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(PrivateDirError, match="not a directory"):
        check_private(tmp_path / "f", "keystore", directory=True)


# ---- one creator of 0700 directories ------------------------------------------------------------


def test_an_empty_directory_of_ours_is_claimed_a_full_one_refused(tmp_path: Path):
    """`fedscore keys init DIR` / `certs --out DIR` on a directory the user just made: made
    0700. One that already holds files is refused: chmod would not take back what was read."""
    empty = tmp_path / "keys"
    empty.mkdir(mode=0o755)
    empty.chmod(0o755)
    assert Keystore.init(empty).path == empty
    assert _mode(empty) == 0o700
    full = tmp_path / "creds"
    full.mkdir()
    full.chmod(0o755)
    (full / "notes.txt").write_text("x")
    with pytest.raises(CredentialError, match="open to other users"):
        write_credentials(full, ["127.0.0.1"], ["payments"], overwrite=True)
    with pytest.raises(PrivateDirError, match="open to other users"):
        ensure_private_dir(full, claim_empty=True)


def test_parents_are_made_and_the_leaf_is_private(tmp_path: Path):
    made = ensure_private_dir(tmp_path / "a" / "b" / "creds", "credentials", parents=True)
    assert _mode(made) == 0o700
    creds = write_credentials(tmp_path / "x" / "y", ["127.0.0.1"], ["payments"])
    assert _mode(creds.root) == 0o700
    assert _mode(creds.root / "nodes") == 0o700


# ---- properties ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(max_size=2048), min_size=1, max_size=4),
       st.booleans(), st.sampled_from([0o022, 0o077, 0o000]), st.booleans())
def test_write_atomic_leaves_the_last_bytes_its_mode_and_nothing_else(contents, public, umask,
                                                                     sync):
    """Whatever the umask and however often a file is replaced: exactly the last bytes, the
    mode asked for, and no temporary beside it."""
    old = os.umask(umask)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "record.json"
            for data in contents:
                write_atomic(path, data, public=public, sync=sync)
            assert path.read_bytes() == contents[-1]
            assert _mode(path) == (0o644 if public else 0o600)
            assert [p.name for p in Path(tmp).iterdir()] == ["record.json"]
    finally:
        os.umask(old)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=256), min_size=1, max_size=6))
def test_appends_concatenate_in_order(chunks):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.log"
        for chunk in chunks:
            with open_append(path, "audit log") as fh:
                fh.write(chunk)
                fh.seek(0)  # a read in between (the audit log reads its tail) moves nothing
                fh.read()
        assert path.read_bytes() == b"".join(chunks)
        assert _mode(path) == 0o600


def test_a_public_append_file_is_0644_and_refused_when_others_may_write(tmp_path: Path):
    path = tmp_path / "ledger.jsonl"
    old = os.umask(0o077)  # public whatever the umask
    try:
        with open_append(path, "privacy ledger", public=True) as fh:
            fh.write(b"{}\n")
    finally:
        os.umask(old)
    assert _mode(path) == 0o644
    path.chmod(0o664)
    with pytest.raises(PrivateFileError, match="writable by other users"), \
            open_append(path, "privacy ledger", public=True):
        pass
