"""Secure sum by pairwise masking: the authority learns sum_k g_k, never a silo's g_k.

Each pair of silos (k, j) agrees on a secret with X25519. The authority relays the public
keys and cannot derive the secret; each key is signed by its silo's identity key, pinned in the
roster every silo holds, so the authority cannot substitute one of its own (crypto/roster.py).
For every message the pair expands the secret with HKDF into a fresh ChaCha20 key bound to the
run, the round, the purpose and a digest of the message the share answers, and draws a mask
vector in the ring Z_2^64. Silo k adds the masks it shares with higher-numbered silos and
subtracts those it shares with lower-numbered ones, so the masks cancel in the sum and each
masked vector alone is uniformly random. Values travel as fixed-point integers (FRACTION_BITS
fractional bits), each clipped to +-MAX_CONTRIBUTION, so the ring holds the sum of up to
max_silos() silos.

Cost: one ChaCha20 keystream of 8 bytes per value per peer, far below a round trip.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 24
SCALE = float(1 << FRACTION_BITS)
RING_BITS = 64
# Every released contribution is clipped to +-MAX_CONTRIBUTION (logit units) by its silo
# before encoding: real contributions are a few units, and the bound is what lets the ring be
# sized for the federation and the authority call a decoded sum implausible.
MAX_CONTRIBUTION = 256.0
# encode() refuses anything beyond this (a value that was not clipped is a bug, not data).
MAX_ABS = MAX_CONTRIBUTION


def max_silos() -> int:
    """The most silos whose clipped contributions sum without wrapping the signed ring."""
    return (2 ** (RING_BITS - 1) - 1) // (int(MAX_CONTRIBUTION) << FRACTION_BITS)


def check_ring(silos: int) -> None:
    """Refuse a federation whose bound sum, silos x MAX_CONTRIBUTION, could wrap the ring: the
    decoded sum would then be wrong without any sign of it."""
    if silos > max_silos():
        raise MaskingError(f"{silos} silos x {MAX_CONTRIBUTION:g} per contribution overflows the "
                           f"{RING_BITS}-bit ring at {FRACTION_BITS} fraction bits; at most "
                           f"{max_silos()} silos")


def clip_contribution(values: np.ndarray) -> np.ndarray:
    """The released contributions clipped to the declared bound."""
    return np.clip(values, -MAX_CONTRIBUTION, MAX_CONTRIBUTION)


class MaskingError(ValueError):
    """A share that cannot be part of a secure sum (wrong shape, stale round, bad key)."""


def encode(values: np.ndarray) -> np.ndarray:
    """Fixed-point encoding of finite floats into Z_2^64 (two's complement)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all() or (np.abs(values) > MAX_ABS).any():
        raise MaskingError(f"secure-sum values must be finite and within +-{MAX_ABS:g} "
                           "(clip_contribution)")
    return np.rint(values * SCALE).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray) -> np.ndarray:
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / SCALE


def ring_sum(shares: list[np.ndarray]) -> np.ndarray:
    """Sum of uint64 shares modulo 2^64 (numpy's unsigned arithmetic wraps)."""
    total = np.zeros_like(shares[0], dtype=np.uint64)
    for share in shares:
        if share.dtype != np.uint64 or share.shape != total.shape:
            raise MaskingError(
                f"a masked share has dtype {share.dtype} and shape {share.shape}, expected "
                f"uint64 {total.shape}; a silo is out of step"
            )
        total += share
    return total


class PairwiseKeys:
    """One silo's X25519 key for a run, and its shared secrets with the other silos."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._key = (X25519PrivateKey.generate() if secret is None
                     else X25519PrivateKey.from_private_bytes(secret))

    def __repr__(self) -> str:
        return "PairwiseKeys(<secret>)"

    @property
    def secret(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    @property
    def public(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)

    def shared_with(self, peer_public: bytes) -> bytes:
        if len(peer_public) != 32:
            raise MaskingError("a peer's masking key must be 32 bytes")
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise MaskingError("a peer sent an invalid masking key") from exc


def _keystream_key(shared: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedscore/mask/v1|" + context).derive(shared)


def pair_mask(shared: bytes, context: bytes, n: int) -> np.ndarray:
    """n pseudo-random ring elements from a pairwise secret, fresh for every `context`."""
    nonce = hashlib.sha256(context).digest()[:16]
    cipher = Cipher(algorithms.ChaCha20(_keystream_key(shared, context), nonce), mode=None)
    stream = cipher.encryptor().update(b"\x00" * (8 * n))
    return np.frombuffer(stream, dtype=np.uint64).copy()


def mask_context(run_key: str, round_: int, purpose: str, binding: bytes) -> bytes:
    """Binds a mask to the run, the round, what is being summed and `binding`, a digest of the
    message it answers: a mask reused on two different messages would let the authority
    subtract the shares and read the difference of exact contributions. Each field is
    length-prefixed so no two tuples encode alike."""
    parts = (run_key.encode(), struct.pack(">Q", round_), purpose.encode(), bytes(binding))
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def masked_share(
    values: np.ndarray,
    me: str,
    shared: dict[str, bytes],
    context: bytes,
) -> np.ndarray:
    """encode(values) + sum of masks with higher-named peers - masks with lower-named ones."""
    share = encode(values)
    for peer, secret in shared.items():
        mask = pair_mask(secret, context, len(share))
        if peer == me:
            raise MaskingError("a silo cannot mask with itself")
        share = share + mask if me < peer else share - mask
    return share
