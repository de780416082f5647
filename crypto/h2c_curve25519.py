"""RFC 9380 hash_to_curve for Curve25519 (suite curve25519_XMD:SHA-512_ELL2_RO_), in Python.

Not the PSI's hash: PSI runs in ristretto255 (crypto/psi.py). This is the alternative issue 18
named first, kept to check expand_message_xmd against RFC 9380's own vectors and to measure it
against the X25519 floor (bench/psi_group.py): its two field exponentiations per identifier cost
more in Python/GMP than the whole ristretto255 hash in libsodium, and every point a party
multiplies would also need a subgroup check that the prime-order ristretto255 encoding makes
unnecessary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import gmpy2
import numpy as np
from gmpy2 import mpz

POINT_BYTES = 32
# RFC 9380 section 3.1: an application-specific domain separation tag naming the suite; the
# version changes whenever the mapping does, so two builds never match each other's points.
DST = b"fedscore-h2c-v1-with-curve25519_XMD:SHA-512_ELL2_RO_"
P = (1 << 255) - 19
L = (1 << 252) + 27742317777372353535851937790883648493  # the prime order of the subgroup
_P = mpz(P)
_A = mpz(486662)
_SQRT_EXP = mpz((P + 3) // 8)  # p = 5 mod 8: x^((p+3)/8) is a root of x or of -x
_SQRT_M1 = gmpy2.powmod(2, (P - 1) // 4, _P)
_SQRT_2_FACTOR = gmpy2.powmod(2, _SQRT_EXP, _P)  # (2g)^((p+3)/8) = this * g^((p+3)/8)
CHUNK_POINTS = 65_536


class HashToCurveError(ValueError):
    """An input hashed to the identity (probability about 2^-250)."""


# ---- RFC 9380: expand_message_xmd (SHA-512) and hash_to_field -----------------------------

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


def _field_pairs(messages: Iterable[bytes], dst: bytes) -> list:
    """hash_to_field(msg, 2) for each message: [u0, u1, u0, u1, ...] (L = 48 bytes each).

    expand_message_xmd inlined for 96 bytes: the zero-padded first block is hashed once and
    copied, which saves one SHA-512 compression per identifier."""
    dst_prime = dst + bytes([len(dst)])
    zpad = hashlib.sha512(bytes(128))
    tail0 = (96).to_bytes(2, "big") + b"\x00" + dst_prime
    tail1, tail2 = b"\x01" + dst_prime, b"\x02" + dst_prime
    sha512, from_bytes = hashlib.sha512, int.from_bytes
    out: list = []
    append = out.append
    for msg in messages:
        h = zpad.copy()
        h.update(msg + tail0)
        b0 = h.digest()
        b1 = sha512(b0 + tail1).digest()
        b2 = sha512((from_bytes(b0, "big") ^ from_bytes(b1, "big")).to_bytes(64, "big")
                    + tail2).digest()
        uniform = b1 + b2
        append(mpz(from_bytes(uniform[:48], "big")) % _P)
        append(mpz(from_bytes(uniform[48:96], "big")) % _P)
    return out


# ---- field helpers --------------------------------------------------------------------------

def _batch_invert(values: Sequence) -> list:
    """Inverses of non-zero field elements with one inversion (Montgomery's trick)."""
    prefix, acc = [], mpz(1)
    for v in values:
        prefix.append(acc)
        acc = acc * v % _P
    inv = gmpy2.invert(acc, _P)
    out = [mpz(0)] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = prefix[i] * inv % _P
        inv = inv * values[i] % _P
    return out


def _elligator2(us: Sequence) -> list[tuple]:
    """RFC 9380 section 6.7.1 map_to_curve_elligator2 on Curve25519 (J = 486662, K = 1,
    Z = 2): affine (x, y) on v^2 = u^3 + A u^2 + u for each field element."""
    denominators = [(1 + 2 * u * u) % _P for u in us]  # never 0: -1/2 is not a square mod p
    inverses = _batch_invert(denominators)
    points = []
    for u, inv in zip(us, inverses, strict=True):
        x1 = -_A * inv % _P
        gx1 = x1 * (x1 * (x1 + _A) + 1) % _P
        c = gmpy2.powmod(gx1, _SQRT_EXP, _P)
        if c * c % _P == gx1:
            x, y, odd = x1, c, 1
        elif c * c % _P == (-gx1) % _P:
            x, y, odd = x1, c * _SQRT_M1 % _P, 1
        else:  # gx1 is not a square, so gx2 = 2 u^2 gx1 is: its root from the same power
            x = (-x1 - _A) % _P
            gx2 = 2 * u * u * gx1 % _P
            y = u * _SQRT_2_FACTOR * c % _P
            if y * y % _P != gx2:
                y = y * _SQRT_M1 % _P
            odd = 0
        if y & 1 != odd:  # sgn0: square branch takes the odd root, the other the even one
            y = (-y) % _P
        points.append((x, y))
    return points


def _add_x(p0: tuple, p1: tuple) -> mpz | None:
    """x-coordinate of p0 + p1 (None for the identity), slow path for the rare equal x."""
    (x0, y0), (x1, y1) = p0, p1
    if x0 != x1:
        lam = (y1 - y0) * gmpy2.invert((x1 - x0) % _P, _P) % _P
    elif y0 == y1 and y0 != 0:
        lam = (3 * x0 * x0 + 2 * _A * x0 + 1) * gmpy2.invert(2 * y0 % _P, _P) % _P
    else:
        return None
    return (lam * lam - _A - x0 - x1) % _P


def _clear_cofactor(xs: Sequence) -> list:
    """u([8]R) for each x = u(R), by three x-only doublings and one batched inversion."""
    zs, outs = [], []
    for x in xs:
        X, Z = x, mpz(1)
        for _ in range(3):
            XX, ZZ, XZ = X * X % _P, Z * Z % _P, X * Z % _P
            X, Z = (XX - ZZ) ** 2 % _P, 4 * XZ * (XX + _A * XZ + ZZ) % _P
        outs.append(X)
        zs.append(Z)
    if any(z == 0 for z in zs):  # [8]R = identity: probability ~2^-250 for a hash output
        raise HashToCurveError("an identifier hashed to a low-order point; use another DST")
    return [X * zi % _P for X, zi in zip(outs, _batch_invert(zs), strict=True)]


def hash_to_curve_u(messages: Sequence[bytes], dst: bytes = DST) -> list:
    """RFC 9380 hash_to_curve (curve25519_XMD:SHA-512_ELL2_RO_): u-coordinates of
    clear_cofactor(map(u0) + map(u1)) as field elements."""
    us = _field_pairs(messages, dst)
    mapped = _elligator2(us)
    sums = []
    for i in range(0, len(mapped), 2):
        x = _add_x(mapped[i], mapped[i + 1])
        if x is None:
            raise HashToCurveError("an identifier hashed to the identity; use another DST")
        sums.append(x)
    return _clear_cofactor(sums)


def _encode(us: Sequence) -> np.ndarray:
    blob = b"".join(int(u).to_bytes(POINT_BYTES, "little") for u in us)
    return np.frombuffer(blob, dtype=np.uint8).reshape(-1, POINT_BYTES).copy()


def hash_to_u_points(ids_e164: Iterable[str], dst: bytes = DST) -> np.ndarray:
    """Map identifiers to points of the prime-order subgroup: (n, 32) uint8 little-endian
    u-coordinates, as X25519 reads them."""
    ids = list(ids_e164) if not isinstance(ids_e164, (list, np.ndarray)) else ids_e164
    points = np.empty((len(ids), POINT_BYTES), dtype=np.uint8)
    for start in range(0, len(ids), CHUNK_POINTS):
        chunk = [str(i).encode() for i in ids[start : start + CHUNK_POINTS]]
        points[start : start + len(chunk)] = _encode(hash_to_curve_u(chunk, dst))
    return points


