"""ECDH private set intersection on Curve25519: RFC 9380 encode_to_curve, X25519 blinding.

Hash. Each party maps its normalised identifiers with the RFC 9380 suite
curve25519_XMD:SHA-512_ELL2_NU_ (section 8.5; encode_to_curve, section 3): expand_message_xmd with
SHA-512 to 48 bytes, reduced to ONE field element u, then the Elligator 2 map (section 6.7.1,
J = 486662, K = 1, Z = 2). Only the map's u-coordinate Q.u is kept: X25519 reads nothing else.
Per identifier that is two SHA-512 compressions, one inversion (batched over a chunk with
Montgomery's trick: three multiplications each and one inversion per chunk) and one Legendre
symbol (gmpy2.legendre, a binary Jacobi algorithm, not an exponentiation); no y, no point
addition.

Cofactor clearing is not computed in the hash, and every point on the wire is still the
standard one. The suite's output is P = [8]Q (h_eff = 8). Every blinding scalar is an X25519
scalar, clamped (RFC 7748 section 5): k = 8 k' with 2^251 <= k' < 2^252. So
    X25519(k, Q.u) = u([k]Q) = u([k']([8]Q)) = u([k']P):
each singly blinded point is exactly the RFC's cofactor-cleared P multiplied by the secret k',
a point of the prime-order subgroup (order L), and a doubly blinded one is [a'b']P. The
unblinded Q, whose torsion component depends on the identifier, never leaves its party.

Why not "SHA-256 as an X25519 u-coordinate" (the mapping before issue 18): a random 255-bit
string is the u-coordinate of a point on Curve25519 or on its quadratic twist, about half each,
and X25519 keeps a point on the side it started on, so every blinded point told its receiver one
bit of H(id), which a dictionary of phone numbers turns into a filter on whose point it is. Now
every hashed point is on the curve, and every blinded point is in the prime-order subgroup:
there is no side, and no torsion component, to read.

Received points. A party multiplies a peer's point only after checking that its u is canonical
(< p) and not on the twist (Legendre symbol of u^3 + A u^2 + u is not -1), and refuses an
all-zero X25519 result (a low-order input; `cryptography` raises on it). No [L]P subgroup check:
the peer's point is R + T with R in the prime-order subgroup and T of order dividing 8, and
[k](R + T) = [k]R because 8 | k, so a torsion component cannot change, or be read from, the
answer; the answer is the one the honest point R would have got.

Non-uniform encoding. encode_to_curve's output distribution on the subgroup is not uniform,
and the RFC does not claim it is indistinguishable from a random oracle (hash_to_curve, the RO
suite, is). The DDH argument for this PSI programs H; Elligator 2 is invertible and reaches a
constant fraction of the curve, so a simulator can still program the field-element hash, at a
constant factor in the bound. The RO suite (two maps and a point addition) would remove that
factor at about twice the hash's cost; bench/RESULTS.md "PSI group after issue 18" has figures.

One exchange between the authority (secret a, identifiers X) and a silo (secret b, identifiers Y):
  1. authority  -> silo      : "blind", declaring |X| (the most points it may ask to finish)
  2. silo       -> authority : b*H(y) for y in Y, in the silo's own row order
  3. authority  -> silo      : a*H(x) for x in X, in the authority's row order (at most |X|)
  4. silo       -> authority : b*(a*H(x)), same order as received
  5. authority computes a*(b*H(y)) and matches: it learns which of its rows the silo holds and
     at which silo row; the silo learns only |X|.
A silo blinds once per run and finishes once, at most the declared number of points
(clients/silo/alignment.py), so the authority cannot use it as a membership oracle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from itertools import repeat
from multiprocessing import get_context

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from gmpy2 import invert, legendre, mpz

POINT_BYTES = 32
SCALAR_BYTES = 32
FIELD_BYTES = 48  # RFC 9380 L = ceil((ceil(log2(p)) + k) / 8) with k = 128
# RFC 9380 section 3.1: an application-specific domain separation tag naming the suite; the
# version changes whenever the mapping does, so two builds never match each other's points.
DST = b"fedscore-psi-v3-with-curve25519_XMD:SHA-512_ELL2_NU_"
P = (1 << 255) - 19
A = 486662
L = (1 << 252) + 27742317777372353535851937790883648493  # the prime-order subgroup's order
_P, _A, _NEG_A = mpz(P), mpz(A), mpz(P - A)
_from_bytes = mpz.from_bytes
# Below this many points a process pool costs more to start than it saves.
_POOL_MIN_POINTS = 20_000
# Points per unit of work: bounds the temporary objects (about 2 MB of points per chunk) and
# feeds the pool evenly; also the batch of one Montgomery inversion in the hash.
CHUNK_POINTS = 65_536


class PsiError(ValueError):
    """A peer sent something that is not a valid PSI message."""


# ---- RFC 9380 encode_to_curve (curve25519_XMD:SHA-512_ELL2_NU_), u-coordinate of the map ----

def expand_message_xmd(msg: bytes, dst: bytes, length: int) -> bytes:
    """RFC 9380 section 5.3.1 with SHA-512 (b_in_bytes 64, s_in_bytes 128): the reference
    the inlined version in `_hash_chunk` is tested against."""
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


def hash_to_field(messages: Iterable[bytes], dst: bytes = DST) -> list:
    """RFC 9380 hash_to_field(msg, 1) for each message: one field element (mpz) each.

    expand_message_xmd(msg, dst, 48) inlined (one output block): the zero-padded first block
    is hashed once and copied, which saves one SHA-512 compression per identifier."""
    dst_prime = dst + bytes([len(dst)])
    zpad = hashlib.sha512(bytes(128))
    tail0 = FIELD_BYTES.to_bytes(2, "big") + b"\x00" + dst_prime
    tail1 = b"\x01" + dst_prime
    sha512, from_bytes = hashlib.sha512, _from_bytes
    out: list = []
    append = out.append
    for msg in messages:
        h = zpad.copy()
        h.update(msg + tail0)
        append(from_bytes(sha512(h.digest() + tail1).digest()[:FIELD_BYTES], "big") % _P)
    return out


def _batch_invert(values: Sequence) -> list:
    """Inverses of non-zero field elements with one inversion (Montgomery's trick)."""
    prefix, acc = [], mpz(1)
    for v in values:
        prefix.append(acc)
        acc = acc * v % _P
    inv = invert(acc, _P)
    out = [mpz(0)] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = prefix[i] * inv % _P
        inv = inv * values[i] % _P
    return out


def elligator2_u(us: Sequence) -> list:
    """RFC 9380 section 6.7.1 map_to_curve_elligator2 on Curve25519, u-coordinate only:
    x1 = -A / (1 + 2 u^2); x1 if x1^3 + A x1^2 + x1 is a square, else -x1 - A."""
    # 1 + 2u^2 is never 0: -1/2 is not a square mod p (p = 5 mod 8), so no exceptional case.
    inverses = _batch_invert([(2 * u * u + 1) % _P for u in us])
    out: list = []
    append = out.append
    for inv in inverses:
        x1 = _NEG_A * inv % _P
        gx1 = x1 * (x1 * (x1 + _A) + 1) % _P
        append(x1 if legendre(gx1, _P) >= 0 else (_NEG_A - x1) % _P)
    return out


def _hash_chunk(ids: Iterable) -> bytes:
    """Map identifiers to 32-byte little-endian u-coordinates of the map output Q (a pool
    job: top-level, plain arguments)."""
    us = elligator2_u(hash_to_field([str(i).encode() for i in ids], DST))
    return b"".join(u.to_bytes(POINT_BYTES, "little") for u in us)


def encode_to_curve_u(messages: Sequence[bytes], dst: bytes = DST) -> list:
    """Q.u for each message, where the RFC's encode_to_curve output is P = [8]Q (the known-
    answer tests multiply by 8 to compare with the RFC's P.x)."""
    return elligator2_u(hash_to_field(messages, dst))


def hash_to_points(ids_e164: Iterable[str], pool: Executor | None = None) -> np.ndarray:
    """Identifiers to (n, 32) uint8 X25519 u-coordinates of their encode_to_curve map points;
    chunks go to `pool` when given (the hash is a tenth of a blinding, but N of them)."""
    ids = list(ids_e164) if not isinstance(ids_e164, (list, np.ndarray)) else ids_e164
    points = np.empty((len(ids), POINT_BYTES), dtype=np.uint8)
    chunks = [ids[i : i + CHUNK_POINTS] for i in range(0, len(ids), CHUNK_POINTS)]
    _fill(points, (pool.map if pool is not None else map)(_hash_chunk, chunks))
    return points


# ---- blinding --------------------------------------------------------------------------------

def _multiply(secret: bytes, blob: bytes, from_peer: bool) -> bytes:
    """X25519(secret, u) for each u in `blob` (a pool job). A peer's u must be canonical and on
    the curve; a low-order u (all-zero result) is refused whoever sent it. Torsion needs no
    check: the clamped scalar is a multiple of 8 and kills it (module docstring)."""
    key = X25519PrivateKey.from_private_bytes(secret)
    load = X25519PublicKey.from_public_bytes
    n = len(blob) // POINT_BYTES
    out = bytearray(len(blob))
    off_curve = low_order = 0
    for k in range(n):
        start = POINT_BYTES * k
        point = blob[start : start + POINT_BYTES]
        if from_peer:
            u = _from_bytes(point, "little")
            # u >= p covers bit 255 too (X25519 would silently drop it); Legendre -1: twist.
            if u >= _P or legendre(u * (u * (u + _A) + 1) % _P, _P) < 0:
                off_curve += 1
                continue
        try:
            out[start : start + POINT_BYTES] = key.exchange(load(point))
        except ValueError:  # OpenSSL refuses an all-zero shared value: a low-order input
            low_order += 1
    if off_curve or low_order:  # counts only, never the points' values
        raise PsiError(
            f"{off_curve} of {n} PSI points are not canonical Curve25519 points (non-canonical "
            f"or on the twist) and {low_order} have low order; the peer's message is malformed "
            "or malicious")
    return bytes(out)


class PsiKey:
    """A party's secret blinding scalar for one alignment: 32 random bytes, clamped by X25519
    (a multiple of 8 in [2^254, 2^255)) at every use."""

    def __init__(self, secret: bytes | None = None) -> None:
        if secret is None:
            secret = X25519PrivateKey.generate().private_bytes_raw()
        if not isinstance(secret, bytes) or len(secret) != SCALAR_BYTES or not any(secret):
            raise ValueError("a PSI secret is 32 random bytes (an X25519 private key), "
                             "not all zero")
        self._secret = bytes(secret)

    def __repr__(self) -> str:  # never show the scalar
        return "PsiKey(<secret>)"

    @property
    def secret(self) -> bytes:
        return self._secret

    def blind(self, points: np.ndarray, workers: int = 1, pool: Executor | None = None,
              from_peer: bool = True) -> np.ndarray:
        """Multiply every point by this key's scalar. A peer's points (`from_peer`, the
        default) are checked first (canonical, on the curve); this party's own hash outputs
        skip that check. `workers` > 1 spreads over processes, or over `pool` when given (see
        `blinding_pool`), which saves starting one per call."""
        points = check_shape(points)
        n = len(points)
        out = np.empty_like(points)
        if n == 0:
            return out
        chunks = (points[i : i + CHUNK_POINTS].tobytes() for i in range(0, n, CHUNK_POINTS))
        with nullcontext(pool) if pool is not None else blinding_pool(workers, n) as use:
            _fill(out, (use.map if use else map)(
                _multiply, repeat(self._secret), chunks, repeat(from_peer)))
        return out


def _fill(out: np.ndarray, results: Iterable[bytes]) -> None:
    start = 0
    for blob in results:
        part = np.frombuffer(blob, dtype=np.uint8).reshape(-1, POINT_BYTES)
        out[start : start + len(part)] = part
        start += len(part)


@contextmanager
def blinding_pool(workers: int, points: int) -> Iterator[Executor | None]:
    """Processes for hashing and blinding `points` points, or None when one is cheaper."""
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


def on_curve(points: np.ndarray) -> np.ndarray:
    """Per point: u canonical (< p) and on Curve25519, not its twist (what a receiver checks)."""
    out = []
    for row in check_shape(points):
        u = _from_bytes(bytes(row), "little")
        out.append(u < _P and legendre(u * (u * (u + _A) + 1) % _P, _P) >= 0)
    return np.array(out, dtype=bool)


def check_points(points: np.ndarray) -> np.ndarray:
    """Validate a peer's points without multiplying them: shape, canonical, on the curve
    (`PsiKey.blind` does the same checks as part of the multiplication)."""
    arr = check_shape(points)
    bad = int((~on_curve(arr)).sum())
    if bad:
        raise PsiError(f"{bad} of {len(arr)} PSI points are not canonical Curve25519 points "
                       "(non-canonical or on the twist); the peer's message is malformed or "
                       "malicious")
    return arr


def match(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) with left[i] == right[j], sorted by i. Inputs are (n, 32) uint8.

    Matching runs on a 64-bit prefix through a hash index, then every pair is confirmed on all
    32 bytes, so a prefix collision can never pair two different people. Only equality is used:
    a peer's malformed point can never equal one this party computed, so no check is needed."""
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
