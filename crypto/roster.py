"""The federation roster: which silos take part and the long-term identity key of each.

Every party holds a long-term Ed25519 identity key (`identity-<party>.key` in its keystore,
0600). The roster pins the silos' public halves; every silo keeps its own copy (`roster.json`
in its directory), and so does the authority (`roster.json` in the parties root). With it:

- a silo signs its per-run masking public key, so the authority relays keys it cannot
  substitute: a silo accepts a peer list only if it names exactly the roster's silos and each
  key carries its silo's signature (clients/silo/alignment.py `peers`);
- a silo answers the authority's `hello` challenge with a signature, so a SuperNode cannot
  claim another silo's name (server/federation.py).

Signed statements are domain-separated and length-prefixed, and name the roster fingerprint,
so a signature made for one purpose, run or federation never verifies for another.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crypto.private_files import load_or_create_secret, write_atomic

ROSTER_FILE = "roster.json"
IDENTITY_FILE = "identity-{party}.key"
IDENTITY_BYTES = 32
ROSTER_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DOMAIN = b"fedscore/roster/v1"


class RosterError(ValueError):
    """A roster that cannot be trusted, or a signature that does not verify under it."""


def identity_key(directory: Path, party: str) -> Ed25519PrivateKey:
    """The party's identity key in `directory` (its keystore), made on first use (0600)."""
    if not _NAME.fullmatch(party):
        raise RosterError(f"party name {party!r} is not an identifier (letters, digits, _ -)")
    path = Path(directory) / IDENTITY_FILE.format(party=party)
    seed = load_or_create_secret(path, IDENTITY_BYTES, "identity key")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()


def _statement(purpose: bytes, *parts: bytes) -> bytes:
    """Domain, purpose and each part with its 8-byte length: no two tuples encode alike."""
    out = [_DOMAIN, struct.pack(">Q", len(purpose)), purpose]
    for part in parts:
        out += [struct.pack(">Q", len(part)), part]
    return b"".join(out)


def masking_statement(fingerprint: str, run_key: str, silo: str, mask_public: bytes) -> bytes:
    """What a silo signs for its masking key: this federation, this run, this silo, this key."""
    return _statement(b"masking-key", fingerprint.encode(), run_key.encode(), silo.encode(),
                      bytes(mask_public))


def hello_statement(fingerprint: str, challenge: bytes, silo: str) -> bytes:
    """What a silo signs to prove its identity to the authority for one challenge."""
    return _statement(b"hello", fingerprint.encode(), bytes(challenge), silo.encode())


def sign(key: Ed25519PrivateKey, statement: bytes) -> bytes:
    return key.sign(statement)


@dataclass(frozen=True)
class Roster:
    """The federation's silos and their identity public keys (hex)."""

    silos: dict[str, str]

    def __post_init__(self) -> None:
        if not self.silos:
            raise RosterError("a roster needs at least one silo")
        for silo, key in self.silos.items():
            if not _NAME.fullmatch(silo):
                raise RosterError(f"roster silo {silo!r} is not an identifier")
            if not re.fullmatch(r"[0-9a-f]{64}", key):
                raise RosterError(f"roster key of silo {silo!r} is not 32 bytes of hex")
        if len(set(self.silos.values())) != len(self.silos):
            # One key for two silos would let one party speak for both.
            raise RosterError("two silos share one identity key in the roster")

    def canonical(self) -> str:
        return json.dumps({"version": ROSTER_VERSION, "silos": dict(sorted(self.silos.items()))},
                          sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON: what operators compare out of band."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    def verify(self, silo: str, statement: bytes, signature: bytes) -> None:
        """Raise RosterError unless `signature` is `silo`'s over `statement`."""
        if silo not in self.silos:
            raise RosterError(f"silo {silo!r} is not in the roster")
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.silos[silo]))
        try:
            public.verify(bytes(signature), statement)
        except InvalidSignature:
            raise RosterError(f"the signature for silo {silo!r} does not verify under its "
                              "roster key") from None

    def to_json(self) -> str:
        return json.dumps({"version": ROSTER_VERSION, "silos": dict(sorted(self.silos.items())),
                           "fingerprint": self.fingerprint}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Roster:
        def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
            keys = [k for k, _ in pairs]
            if len(set(keys)) != len(keys):
                raise RosterError("the roster names a key twice (a silo listed twice); refused")
            return dict(pairs)

        try:
            raw = json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise RosterError(f"the roster is not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != ROSTER_VERSION or \
                not isinstance(raw.get("silos"), dict):
            raise RosterError(f"the roster must be {{'version': {ROSTER_VERSION}, 'silos': "
                              "{silo: key hex}}")
        roster = cls({str(k): str(v) for k, v in raw["silos"].items()})
        if "fingerprint" in raw and raw["fingerprint"] != roster.fingerprint:
            raise RosterError("the roster's fingerprint does not match its silos; it was edited")
        return roster

    @classmethod
    def load(cls, path: Path) -> Roster:
        path = Path(path)
        if not path.exists():
            raise RosterError(f"no roster at {path}: enrol the federation's silos first "
                              "(`fedscore generate` or `fedscore run` writes one)")
        return cls.from_json(path.read_text())

    def write(self, path: Path) -> None:
        write_atomic(path, self.to_json(), public=True)  # public keys: readable by all


def authority_roster(parties_root: Path) -> Roster:
    """The authority's copy of the roster, in the parties root."""
    return Roster.load(Path(parties_root) / ROSTER_FILE)
