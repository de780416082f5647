"""Randomness an adversary must not predict, keyed by a secret only the drawing party holds.

Every draw a privacy guarantee rests on (DP noise, Poisson batch plans, randomised response,
the split, the order of positions, transcript noise, noisy statistics) comes from a stream of
ChaCha20 with 20 rounds (randomgen's `ChaCha`, a cryptographically secure generator) keyed by
HKDF-SHA256(party secret, purpose). The public run seed never enters these streams: it may
choose the generated data and the models' initialisation, nothing else.

Streams are addressed by purpose (e.g. "dp-noise", run key, step): the same party secret and
purpose give the same numbers, so keeping the keystores reproduces a run bit for bit, and a
message re-sent after a crash draws the same noise again instead of releasing a second,
independent sample. Without the secret the streams are unpredictable.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from randomgen import ChaCha

from crypto.private_files import load_or_create_secret

log = logging.getLogger(__name__)

SECRET_BYTES = 32
SECRET_FILE = "randomness-{party}.key"


class SecretRandom:
    """A party's keyed random streams. The secret never leaves this object (no repr, no log)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a randomness secret has {SECRET_BYTES} bytes")
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        return "SecretRandom(<secret>)"

    @classmethod
    def load_or_create(cls, directory: Path, party: str) -> SecretRandom:
        """The party's secret in `directory` (its keystore), made on first use (0600)."""
        path = Path(directory) / SECRET_FILE.format(party=party)
        return cls(load_or_create_secret(path, SECRET_BYTES, "randomness secret"))

    def key(self, *purpose: object) -> bytes:
        """32 bytes derived for `purpose`; distinct purposes give independent keys."""
        info = "/".join(str(p) for p in ("fedscore-rng", *purpose)).encode()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
            self._secret)

    def generator(self, *purpose: object) -> np.random.Generator:
        """A numpy Generator over ChaCha20-20 keyed for `purpose`."""
        return generator_from_key(self.key(*purpose))


def generator_from_key(key: bytes) -> np.random.Generator:
    """The stream of a key derived by `SecretRandom.key` (e.g. handed to a simulation-only
    reference that must replay a party's draws)."""
    return np.random.Generator(ChaCha(key=int.from_bytes(key, "little"), counter=0, rounds=20))


def digest(array: np.ndarray) -> str:
    """A short public digest of an array, to bind a stream to the message it serves."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]
