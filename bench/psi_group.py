"""PSI group cost: ristretto255 (the PSI's group) against the X25519 floor, same run, same count.

The PSI of one run with N authority people and three silos holding m_k of them (plus some
outsiders) needs N + sum_k (N + 2 m_k) scalar multiplications and N + sum_k m_k hashes. This
script runs that whole computation in-process (hash every set, blind, blind the authority's
points again per silo, blind each silo's points, match), spread over a process pool, and times
the *floor*: the same number of plain X25519 exchanges (`cryptography`, on random points) over
the same pool. The two are interleaved slice by slice, so load from other processes falls on
both alike. No Flower messages: bench/psi_throughput.py measures the protocol end to end.

It also times, per operation on one core, the pieces of both candidate groups: ristretto255
(libsodium: hash_to_ristretto255, scalar multiplication with its built-in decoding check) and
the Curve25519 route (RFC 9380 curve25519_XMD:SHA-512_ELL2_RO_ in Python/gmpy2, X25519, and
the subgroup check a received u-coordinate would need), and projects the Curve25519 route's
PSI from them.

    nice .venv/bin/python bench/psi_group.py --users 100000 1000000 [--workers 2]
Acceptance (issue 18): PSI in the new group at 1,000,000 people <= 1.25x the X25519 floor.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from multiprocessing import get_context

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from crypto import h2c_curve25519 as h2c
from crypto.psi import PsiKey, hash_to_points, match

SILO_COVERAGE = (0.97, 0.93, 0.95)  # the generator's defaults (simulations/population.py)
OUTSIDERS = 0.03
SLICES = 8
FLOOR_POOL = 200_000  # random points, reused cyclically: the same cost per exchange
CHECK = "subgroup check per received point (libsodium [L]P)"


def _phones(start: int, n: int) -> list[str]:
    return [f"+86{13_000_000_000 + i}" for i in range(start, start + n)]


def _floor(secret: bytes, blob: bytes) -> int:
    key = X25519PrivateKey.from_private_bytes(secret)
    load = X25519PublicKey.from_public_bytes
    for i in range(0, len(blob), 32):
        key.exchange(load(blob[i : i + 32]))
    return len(blob) // 32


def _hash_blind(secret: bytes, ids: list[str]) -> bytes:
    return PsiKey(secret).blind(hash_to_points(ids)).tobytes()


def _blind(secret: bytes, blob: bytes) -> bytes:
    return PsiKey(secret).blind(np.frombuffer(blob, np.uint8).reshape(-1, 32)).tobytes()


def _random_points(n: int) -> bytes:
    raw = bytearray(os.urandom(32 * n))
    for i in range(31, len(raw), 32):
        raw[i] &= 0x7F
    return bytes(raw)


def _slices(items, k: int):
    step = -(-len(items) // k)
    return [items[i : i + step] for i in range(0, len(items), step)]


def run(n: int, workers: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    authority = _phones(0, n)
    silos = []
    for k, cover in enumerate(SILO_COVERAGE):
        held = np.flatnonzero(rng.random(n) < cover)
        extra = _phones(n + k * n, int(OUTSIDERS * n))
        silos.append([authority[i] for i in held] + extra)
    m = [len(s) for s in silos]
    ops = n + sum(n + 2 * mk for mk in m)
    a = PsiKey()
    b = [PsiKey() for _ in silos]
    x_secret = X25519PrivateKey.generate().private_bytes_raw()
    floor_points = _random_points(FLOOR_POOL)

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_floor, repeat(x_secret, workers), [floor_points[:3200]] * workers))
        floor_s = group_s = 0.0
        # The group's work in slices: every party hashes and blinds its own set ...
        own_parts, silo_parts = [], [[] for _ in silos]
        jobs = [("a", None, part) for part in _slices(authority, SLICES)]
        for k, s in enumerate(silos):
            jobs += [("s", k, part) for part in _slices(s, SLICES)]
        floor_left = ops
        per_job = -(-ops // (len(jobs) + SLICES * len(silos)))

        def floor_slice() -> None:
            nonlocal floor_s, floor_left
            count = min(per_job, floor_left)
            if count <= 0:
                return
            blobs = []
            for start in range(0, count, 8192):
                c = min(8192, count - start)
                off = 32 * ((floor_left + start) % (FLOOR_POOL - 8192))
                blobs.append(floor_points[off : off + 32 * c])
            t = time.perf_counter()
            done = sum(pool.map(_floor, repeat(x_secret), blobs))
            floor_s += time.perf_counter() - t
            floor_left -= done

        for who, k, part in jobs:
            chunks = _slices(part, max(1, workers * 2))
            secret = a.secret if who == "a" else b[k].secret
            t = time.perf_counter()
            out = b"".join(pool.map(_hash_blind, repeat(secret), chunks))
            group_s += time.perf_counter() - t
            (own_parts if who == "a" else silo_parts[k]).append(out)
            floor_slice()
        own = b"".join(own_parts)
        own_chunks = [own[i : i + 32 * 8192] for i in range(0, len(own), 32 * 8192)]
        theirs, doubled = [], []
        for k in range(len(silos)):
            # ... each silo blinds the authority's points again, the authority blinds theirs.
            t = time.perf_counter()
            doubled.append(b"".join(pool.map(_blind, repeat(b[k].secret), own_chunks)))
            blob = b"".join(silo_parts[k])
            theirs.append(b"".join(pool.map(
                _blind, repeat(a.secret),
                [blob[i : i + 32 * 8192] for i in range(0, len(blob), 32 * 8192)])))
            group_s += time.perf_counter() - t
            for _ in range(SLICES):
                floor_slice()
        t = time.perf_counter()
        matched = []
        for k in range(len(silos)):
            i, _ = match(np.frombuffer(doubled[k], np.uint8).reshape(-1, 32),
                         np.frombuffer(theirs[k], np.uint8).reshape(-1, 32))
            matched.append(len(i))
        group_s += time.perf_counter() - t
        while floor_left > 0:
            floor_slice()
    expected = [len(set(s) & set(authority)) for s in silos]
    assert matched == expected, (matched, expected)
    return {"n": n, "silos": m, "ops": ops, "floor_s": floor_s, "group_s": group_s,
            "ratio": group_s / floor_s}


def _us(t0: float, count: int) -> float:
    return (time.perf_counter() - t0) / count * 1e6


def per_op(sample: int = 4000) -> dict:
    """Microseconds per operation on one core, this run."""
    ids = _phones(0, sample)
    res = {}
    t = time.perf_counter()
    pts = hash_to_points(ids)
    res["ristretto255 hash"] = _us(t, sample)
    key = PsiKey()
    t = time.perf_counter()
    key.blind(pts)
    res["ristretto255 scalarmult (decoding check included)"] = _us(t, sample)
    blob = _random_points(sample)
    secret = X25519PrivateKey.generate().private_bytes_raw()
    t = time.perf_counter()
    _floor(secret, blob)
    res["X25519 exchange (floor)"] = _us(t, sample)
    t = time.perf_counter()
    h2c.hash_to_u_points(ids[: sample // 4])
    res["RFC 9380 curve25519 ELL2_RO hash (gmpy2)"] = _us(t, sample // 4)
    try:  # PyNaCl is optional: libsodium's [L]P check stands for a received point's check
        from nacl import bindings as nb
    except ImportError:
        return res
    eds = [nb.crypto_scalarmult_ed25519_base_noclamp(
        nb.crypto_core_ed25519_scalar_reduce(os.urandom(64))) for _ in range(sample // 4)]
    t = time.perf_counter()
    for e in eds:
        nb.crypto_core_ed25519_is_valid_point(e)
    res[CHECK] = _us(t, len(eds))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    ops = per_op()
    print("per operation, one core (us):")
    for k, v in ops.items():
        print(f"  {k:52s} {v:8.1f}")
    for n in args.users:
        r = run(n, args.workers)
        print(f"N={n:,} silos={r['silos']} scalar mults={r['ops']:,}: ristretto255 PSI "
              f"{r['group_s']:.1f} s, X25519 floor {r['floor_s']:.1f} s, "
              f"ratio {r['ratio']:.2f} (target <= 1.25)", flush=True)
        hashes = n + sum(r["silos"])
        x = ops["X25519 exchange (floor)"]
        received = n * 3 + sum(r["silos"])  # points a party multiplies after receiving them
        check = ops.get(CHECK, float("nan"))
        curve = (r["ops"] * x + hashes * ops["RFC 9380 curve25519 ELL2_RO hash (gmpy2)"]
                 + received * check) / (r["ops"] * x)
        print(f"  projected Curve25519 route (RFC 9380 hash in Python + subgroup check per "
              f"received point + X25519) at this N: {curve:.2f}x the floor (protocol "
              "overheads excluded)")


if __name__ == "__main__":
    main()
