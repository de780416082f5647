"""ECDH private set intersection in ristretto255, a group of prime order.

Each party hashes its normalised identifiers to group elements with ristretto255's standard
hash-to-group (RFC 9496 section 4.3.4 with RFC 9380's expand_message_xmd: 64 uniform bytes from
SHA-512, the one-way map on each half, their sum) and blinds them with a secret scalar.
Blinding commutes (a*(b*P) == b*(a*P)), so doubly blinded values match exactly when the
identifiers match, and reveal nothing else under the decisional Diffie-Hellman assumption in a
group of prime order L.

Why not "SHA-256 as an X25519 u-coordinate" (the mapping before issue 18): a random 255-bit
string is the u-coordinate of a point on Curve25519 or on its quadratic twist, about half each,
and X25519 keeps a point on the side it started on, so every blinded point told its receiver one
bit of H(id), which a dictionary of phone numbers turns into a filter on whose point it is.
ristretto255 has no twist and no cofactor: every valid 32-byte encoding is an element of the
prime-order group, decoding refuses anything else (non-canonical, off-curve, twist, torsion),
and the identity is refused as a result. So every point a party multiplies is validated by the
multiplication itself, at no extra cost. (The Curve25519 route, RFC 9380 Elligator 2 plus a
subgroup check per received point, is crypto/h2c_curve25519.py; bench/psi_group.py measures
both against the X25519 floor.)

One exchange between the authority (secret a, identifiers X) and a silo (secret b, identifiers Y):
  1. authority  -> silo      : "blind", declaring |X| (the most points it may ask to finish)
  2. silo       -> authority : b*H(y) for y in Y, in the silo's own row order
  3. authority  -> silo      : a*H(x) for x in X, in the authority's row order (at most |X|)
  4. silo       -> authority : b*(a*H(x)), same order as received
  5. authority computes a*(b*H(y)) and matches: it learns which of its rows the silo holds and
     at which silo row; the silo learns only |X|.
A silo blinds once per run and finishes once, at most the declared number of points
(clients/client_app.py), so the authority cannot use it as a membership oracle.

The group operations are libsodium's (the system's libsodium.so.23, 1.0.18 or later, through
ctypes: PyNaCl's bundled build leaves ristretto255 out).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import cache
from itertools import repeat
from multiprocessing import get_context

import numpy as np
import pandas as pd

POINT_BYTES = 32
SCALAR_BYTES = 32
UNIFORM_BYTES = 64
# RFC 9380 section 3.1: an application-specific domain separation tag naming the suite
# (RFC 9380 appendix B's ristretto255_XMD:SHA-512_R255MAP_RO_); the version changes whenever
# the mapping does, so two builds never match each other's points.
DST = b"fedscore-psi-v2-with-ristretto255_XMD:SHA-512_R255MAP_RO_"
L = (1 << 252) + 27742317777372353535851937790883648493  # the group's prime order
# Below this many points a process pool costs more to start than it saves.
_POOL_MIN_POINTS = 20_000
# Points per unit of work: bounds the temporary bytes objects (about 2 MB per chunk, where a
# whole million-person set at once held ~100 MB of small objects) and feeds the pool evenly.
CHUNK_POINTS = 65_536


class PsiError(ValueError):
    """A peer sent something that is not a valid PSI message."""


@cache
def _sodium() -> ctypes.CDLL:
    """libsodium with ristretto255 (1.0.18+), loaded once per process."""
    name = ctypes.util.find_library("sodium") or "libsodium.so.23"
    try:
        lib = ctypes.CDLL(name)
        lib.crypto_core_ristretto255_from_hash  # noqa: B018 - present since 1.0.18
    except (OSError, AttributeError) as exc:
        raise RuntimeError(
            "PSI needs libsodium 1.0.18 or later with ristretto255 (Debian: libsodium23)"
        ) from exc
    if lib.sodium_init() < 0:
        raise RuntimeError("libsodium failed to initialise")
    buf = ctypes.c_char_p
    lib.crypto_core_ristretto255_from_hash.argtypes = [ctypes.c_void_p, buf]
    lib.crypto_scalarmult_ristretto255.argtypes = [ctypes.c_void_p, buf, buf]
    lib.crypto_core_ristretto255_is_valid_point.argtypes = [buf]
    lib.crypto_core_ristretto255_scalar_random.argtypes = [ctypes.c_void_p]
    return lib


def expand_message_xmd(msg: bytes, dst: bytes, length: int) -> bytes:
    """RFC 9380 section 5.3.1 with SHA-512 (b_in_bytes 64, s_in_bytes 128)."""
    ell = -(-length // 64)
    if ell > 255 or length > 65535 or len(dst) > 255:
        raise ValueError("expand_message_xmd: length or DST too long")
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(bytes(128) + msg + length.to_bytes(2, "big") + b"\x00" + dst_prime
                        ).digest()
    blocks = [hashlib.sha512(b0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        mixed = (int.from_bytes(b0, "big") ^ int.from_bytes(blocks[-1], "big")).to_bytes(64, "big")
        blocks.append(hashlib.sha512(mixed + bytes([i]) + dst_prime).digest())
    return b"".join(blocks)[:length]


def hash_to_group(messages: Iterable[bytes], dst: bytes = DST) -> bytes:
    """hash_to_ristretto255 of each message, concatenated 32-byte encodings.

    expand_message_xmd(msg, dst, 64) inlined (one output block): the zero-padded first block
    is hashed once and copied, which saves one SHA-512 compression per identifier."""
    lib = _sodium()
    dst_prime = dst + bytes([len(dst)])
    zpad = hashlib.sha512(bytes(128))
    tail0 = UNIFORM_BYTES.to_bytes(2, "big") + b"\x00" + dst_prime
    tail1 = b"\x01" + dst_prime
    sha512, from_hash = hashlib.sha512, lib.crypto_core_ristretto255_from_hash
    messages = list(messages)
    out = ctypes.create_string_buffer(POINT_BYTES * len(messages))
    base = ctypes.addressof(out)
    for k, msg in enumerate(messages):
        h = zpad.copy()
        h.update(msg + tail0)
        from_hash(base + POINT_BYTES * k, sha512(h.digest() + tail1).digest())
    return out.raw


def hash_to_points(ids_e164: Iterable[str], dst: bytes = DST) -> np.ndarray:
    """Map identifiers to ristretto255 elements: (n, 32) uint8 encodings."""
    ids = list(ids_e164) if not isinstance(ids_e164, (list, np.ndarray)) else ids_e164
    points = np.empty((len(ids), POINT_BYTES), dtype=np.uint8)
    for start in range(0, len(ids), CHUNK_POINTS):
        chunk = ids[start : start + CHUNK_POINTS]
        blob = hash_to_group((str(i).encode() for i in chunk), dst)
        points[start : start + len(chunk)] = np.frombuffer(blob, np.uint8).reshape(-1, 32)
    return points


def _multiply(secret: bytes, blob: bytes) -> bytes:
    """secret * P for each encoding in `blob`; libsodium decodes each P first and refuses
    anything that is not a canonical encoding of a group element, or an identity result."""
    mult = _sodium().crypto_scalarmult_ristretto255
    n = len(blob) // POINT_BYTES
    out = ctypes.create_string_buffer(len(blob))
    base = ctypes.addressof(out)
    bad = 0
    for k in range(n):
        bad += mult(base + POINT_BYTES * k, secret, blob[POINT_BYTES * k : POINT_BYTES * (k + 1)])
    if bad:  # rc is 0 or -1 per point; the message counts them, never shows their values
        raise PsiError(
            f"{-bad} of {n} PSI points are not ristretto255 group elements (or are the "
            "identity); the peer's message is malformed or malicious"
        )
    return out.raw


class PsiKey:
    """A party's secret blinding scalar for one alignment: uniform in [1, L)."""

    def __init__(self, secret: bytes | None = None) -> None:
        if secret is None:
            buf = ctypes.create_string_buffer(SCALAR_BYTES)
            _sodium().crypto_core_ristretto255_scalar_random(buf)
            secret = buf.raw
        value = int.from_bytes(secret, "little")
        if len(secret) != SCALAR_BYTES or not 0 < value < L:
            raise ValueError("a PSI secret is a canonical non-zero ristretto255 scalar")
        self._secret = bytes(secret)

    def __repr__(self) -> str:  # never show the scalar
        return "PsiKey(<secret>)"

    @property
    def secret(self) -> bytes:
        return self._secret

    def blind(self, points: np.ndarray, workers: int = 1, pool: Executor | None = None
              ) -> np.ndarray:
        """Multiply every point by this key's scalar, refusing any that is not a group
        element; `workers` > 1 spreads over processes, or over `pool` when given (see
        `blinding_pool`), which saves starting one per call."""
        points = check_shape(points)
        n = len(points)
        out = np.empty_like(points)
        if n == 0:
            return out
        chunks = (points[i : i + CHUNK_POINTS].tobytes() for i in range(0, n, CHUNK_POINTS))
        with nullcontext(pool) if pool is not None else blinding_pool(workers, n) as use:
            self._fill(out, (use.map if use else map)(_multiply, repeat(self._secret), chunks))
        return out

    @staticmethod
    def _fill(out: np.ndarray, results: Iterable[bytes]) -> None:
        start = 0
        for blob in results:
            part = np.frombuffer(blob, dtype=np.uint8).reshape(-1, POINT_BYTES)
            out[start : start + len(part)] = part
            start += len(part)


@contextmanager
def blinding_pool(workers: int, points: int) -> Iterator[Executor | None]:
    """Processes for blinding `points` points, or None when one process is cheaper."""
    if workers <= 1 or points < _POOL_MIN_POINTS:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield pool


def check_shape(points: np.ndarray) -> np.ndarray:
    """A peer's point array must be (n, 32) uint8."""
    arr = np.asarray(points)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != POINT_BYTES:
        raise PsiError(
            f"PSI points must be an (n, 32) uint8 array, got shape {arr.shape} "
            f"dtype {arr.dtype}; the peer runs an incompatible protocol version"
        )
    return np.ascontiguousarray(arr)


def valid_points(points: np.ndarray) -> np.ndarray:
    """Per point: a canonical encoding of a non-identity ristretto255 element."""
    arr = check_shape(points)
    valid = _sodium().crypto_core_ristretto255_is_valid_point
    return np.fromiter((valid(bytes(row)) == 1 for row in arr), dtype=bool, count=len(arr))


def check_points(points: np.ndarray) -> np.ndarray:
    """Validate a peer's points: shape, and every one a group element (`blind` does this as
    part of the multiplication; this is for points only compared or stored)."""
    arr = check_shape(points)
    bad = int((~valid_points(arr)).sum())
    if bad:
        raise PsiError(f"{bad} of {len(arr)} PSI points are not ristretto255 group elements; "
                       "the peer's message is malformed or malicious")
    return arr


def match(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) with left[i] == right[j], sorted by i. Inputs are (n, 32) uint8.

    Matching runs on a 64-bit prefix through a hash index, then every pair is confirmed on all
    32 bytes, so a prefix collision can never pair two different people. Only equality is used:
    a peer's invalid point can never equal one this party computed, so no decoding is needed."""
    left, right = check_shape(left), check_shape(right)
    lkey = left[:, :8].copy().view(np.uint64).ravel()
    rkey = right[:, :8].copy().view(np.uint64).ravel()
    if len(np.unique(rkey)) != len(rkey):
        raise PsiError("duplicate blinded identifiers from a peer; identifiers must be unique")
    pos = pd.Index(rkey).get_indexer(lkey)
    i = np.flatnonzero(pos >= 0)
    j = pos[i]
    same = (left[i] == right[j]).all(axis=1)
    return i[same], j[same]
