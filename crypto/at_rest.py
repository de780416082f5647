"""Encryption at rest: a keystore of data keys, and authenticated encryption bound to context.

Suites: `aes-256-gcm` (default) and `sm4-gcm` (the national-standard suite). Every file is
    MAGIC | suite id (1 byte) | key id (8 bytes) | nonce (12 bytes) | ciphertext + tag
and the header plus a caller-supplied context (e.g. run id, party, file name) is authenticated
as associated data, so a file cannot be swapped between runs or parties unnoticed.

Key files live in a keystore directory (0700) with 0600 permissions; a key file that others
can read is refused, as is a missing keystore. Rotation adds a key and makes it active; old keys
stay for decryption. Keys are never logged or shown in an exception.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.identity import check_party_name
from crypto.private_files import (
    PrivateFileError,
    check_private,
    ensure_private_dir,
    write_atomic,
    write_private,
)

MAGIC = b"FSENC1"
SUITES = {"aes-256-gcm": (1, 32), "sm4-gcm": (2, 16)}  # id, key length
# The keyed hash of subject references that goes with each suite.
REF_HASH = {"aes-256-gcm": "sha256", "sm4-gcm": "sm3"}
_SUITE_BY_ID = {v[0]: k for k, v in SUITES.items()}
HEADER = len(MAGIC) + 1 + 8 + 12
TAG = 16
META = "keystore.json"


class AtRestError(ValueError):
    """A keystore or encrypted file that cannot be used: named problem, suggested fix."""


@dataclass(frozen=True)
class Key:
    key_id: bytes
    suite: str
    material: bytes

    def __repr__(self) -> str:  # never show key material
        return f"Key(id={self.key_id.hex()}, suite={self.suite})"


class Keystore:
    """A directory of data keys; one is active for new encryptions."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta = self.path / META
        if not meta.exists():
            raise AtRestError(
                f"no keystore at {self.path}; create one with `fedscore keys init {self.path}`"
            )
        _check_private(self.path, "keystore", directory=True)
        self.meta = json.loads(meta.read_text())
        if self.meta.get("suite") not in SUITES:
            raise AtRestError(f"{meta} names an unknown suite; restore the keystore from backup")

    @classmethod
    def init(cls, path: Path, suite: str = "aes-256-gcm") -> Keystore:
        if suite not in SUITES:
            raise AtRestError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise AtRestError(f"{path} is not empty; a keystore needs a new directory")
        try:
            ensure_private_dir(path, "keystore", parents=True, claim_empty=True)
        except PrivateFileError as exc:
            raise AtRestError(str(exc)) from None
        write_atomic(path / META, json.dumps({"suite": suite, "active": None, "keys": []}))
        store = cls(path)
        store.rotate()
        return store

    @classmethod
    def open_or_init(cls, path: Path, suite: str = "aes-256-gcm") -> Keystore:
        """The keystore at `path`, created on first use. Creation builds it in a private
        temporary directory and renames it into place, so parties starting together never
        see a half-made keystore: the one rename that wins is the keystore for all."""
        path = Path(path)
        if (path / META).exists():
            return cls(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            cls.init(staging, suite)
            try:
                os.rename(staging, path)
            except OSError:  # another party created it first
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return cls(path)

    @property
    def suite(self) -> str:
        return str(self.meta["suite"])

    def rotate(self) -> Key:
        """Add a fresh key and make it active; older keys still decrypt."""
        key_id = secrets.token_bytes(8)
        material = secrets.token_bytes(SUITES[self.suite][1])
        target = self.path / f"key-{key_id.hex()}.bin"
        write_private(target, material)
        self.meta["keys"].append(key_id.hex())
        self.meta["active"] = key_id.hex()
        write_atomic(self.path / META, json.dumps(self.meta))
        return Key(key_id, self.suite, material)

    def active(self) -> Key:
        return self.key(bytes.fromhex(self.meta["active"]))

    def key(self, key_id: bytes) -> Key:
        if key_id.hex() not in self.meta["keys"]:
            raise AtRestError(
                f"the file was encrypted with key {key_id.hex()}, which the keystore at "
                f"{self.path} does not hold; use the keystore it was written with"
            )
        path = self.path / f"key-{key_id.hex()}.bin"
        _check_private(path, "key file")
        material = path.read_bytes()
        # Exactly the suite's length: AESGCM takes 16, 24 or 32 bytes, so a key file cut to 16
        # would otherwise silently become AES-128 (and one of 24, AES-192).
        expected = SUITES[self.suite][1]
        if len(material) != expected:
            raise AtRestError(
                f"key file {path} holds {len(material)} bytes, but {self.suite} keys are "
                f"{expected} bytes: the file is damaged or was replaced; restore it from backup"
            )
        return Key(key_id, self.suite, material)


def _check_private(path: Path, what: str, directory: bool = False) -> None:
    """crypto/private_files.py's check, raising the keystore's own error."""
    try:
        check_private(path, what, directory=directory)
    except PrivateFileError as exc:
        raise AtRestError(str(exc)) from None


def _crypt(key: Key, nonce: bytes, data: bytes | memoryview, aad: bytes, encrypt: bool) -> bytes:
    # Checked again here, for keys made outside Keystore.key: the suite fixes the key length.
    if len(key.material) != SUITES[key.suite][1]:
        raise AtRestError(f"a {key.suite} key must be {SUITES[key.suite][1]} bytes; refusing a "
                          f"key of {len(key.material)}")
    if key.suite == "aes-256-gcm":
        aead = AESGCM(key.material)
        return aead.encrypt(nonce, data, aad) if encrypt else aead.decrypt(nonce, data, aad)
    if encrypt:
        enc = Cipher(algorithms.SM4(key.material), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        return enc.update(data) + enc.finalize() + enc.tag
    if len(data) < TAG:
        raise InvalidTag
    dec = Cipher(algorithms.SM4(key.material), modes.GCM(nonce, bytes(data[-TAG:]))).decryptor()
    dec.authenticate_additional_data(aad)
    return dec.update(data[:-TAG]) + dec.finalize()


def encrypt(store: Keystore, data: bytes, context: bytes) -> bytes:
    key = store.active()
    nonce = secrets.token_bytes(12)
    header = MAGIC + bytes([SUITES[key.suite][0]]) + key.key_id + nonce
    return header + _crypt(key, nonce, data, header + context, encrypt=True)


def decrypt(store: Keystore, blob: bytes, context: bytes) -> bytes:
    if len(blob) < HEADER + TAG or not blob.startswith(MAGIC):
        raise AtRestError("not a fedscore encrypted file (bad header); was it truncated?")
    suite = _SUITE_BY_ID.get(blob[len(MAGIC)])
    if suite != store.suite:
        raise AtRestError(
            f"the file uses suite {suite}, the keystore {store.suite}; use the right keystore"
        )
    key_id = blob[len(MAGIC) + 1 : len(MAGIC) + 9]
    nonce = blob[len(MAGIC) + 9 : HEADER]
    key = store.key(key_id)
    try:
        # A view, not a slice: a party table is hundreds of MB and a slice would copy it.
        return _crypt(key, nonce, memoryview(blob)[HEADER:], blob[:HEADER] + context,
                      encrypt=False)
    except InvalidTag:
        raise AtRestError(
            "authentication failed: the file was modified, or it belongs to another run or "
            "party than the one given; restore it from the run that wrote it"
        ) from None


def write_encrypted(store: Keystore, path: Path, data: bytes, context: bytes) -> None:
    """Atomically: a reader sees the whole encrypted file or none, never a partial one."""
    # Not fsynced: party tables are hundreds of MB and a run writes them again.
    write_atomic(path, encrypt(store, data, context), sync=False)


def read_encrypted(store: Keystore, path: Path, context: bytes) -> bytes:
    return decrypt(store, path.read_bytes(), context)


# ---- which keystore --------------------------------------------------------------------------

AUTO = "auto"
NONE = "none"


def keystore_path(setting: str, parties_root: Path) -> Path | None:
    """`storage.keystore`: "auto" = `<parties>.keys` beside the party tables (created on first
    use; the simulation's operator holds every party), "none" = plaintext, else a directory."""
    if setting == NONE:
        return None
    if setting == AUTO:
        root = Path(parties_root).resolve()
        return root.with_name(root.name + ".keys")
    return Path(setting)


def open_keystore(setting: str, parties_root: Path) -> Keystore | None:
    path = keystore_path(setting, parties_root)
    if path is None:
        return None
    return Keystore.open_or_init(path) if setting == AUTO else Keystore(path)


# ---- files that live with a party, outside any run ---------------------------------------------


def party_context(party: str, name: str) -> bytes:
    """A party's table (features, labels, the generator's truth) is bound to the party and the
    file's name, not to a run: tables outlive runs. The party's name is checked: it also names
    the party's directory."""
    check_party_name(party)
    return f"fedscore/parties/{party}/{name}".encode()


def read_party_file(path: Path, party: str, store: Keystore | None) -> bytes:
    """The plaintext of `path`: decrypted when it is an `.enc` file, which needs `store`."""
    if path.suffix != ".enc":
        return path.read_bytes()
    if store is None:
        raise AtRestError(
            f"{path} is encrypted; give the keystore it was written with "
            "(`--set storage.keystore=DIR`, or node config `keystore=DIR` for a silo)"
        )
    return read_encrypted(store, path, party_context(party, path.name.removesuffix(".enc")))


def write_party_file(path: Path, party: str, data: bytes, store: Keystore | None) -> Path:
    """Write `path`, or `path.enc` encrypted and bound to the party when `store` is given."""
    if store is None:
        path.write_bytes(data)
        return path
    target = path.with_name(path.name + ".enc")
    write_encrypted(store, target, data, party_context(party, path.name))
    return target
