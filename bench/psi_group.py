"""PSI group cost: the PSI computation of one run against the X25519 floor, same run, same count.

The PSI of one run with N authority people and three silos holding m_k of them (plus some
outsiders) needs N + sum_k (N + 2 m_k) scalar multiplications and N + sum_k m_k hashes. This
script runs that whole computation in-process, spread over a process pool: every party hashes
its set (RFC 9380 curve25519_XMD:SHA-512_ELL2_NU_) and blinds it (X25519), each silo blinds the
authority's points again and the authority blinds each silo's points, both checking the points
they received (canonical, not on the twist), then the authority matches. The *floor* is the
same number of plain X25519 exchanges (`cryptography`, on random points, no hash, no check)
over the same pool. The two are interleaved task by task, each floor slice as many exchanges as
the PSI task before it, so load from other processes falls on both alike. No Flower messages:
bench/psi_throughput.py measures the protocol end to end.

It also times, per operation on one core, the pieces: the hash, the received-point check, an
X25519 exchange as PSI calls it and as the floor calls it.

    nice .venv/bin/python bench/psi_group.py --users 100000 1000000 [--workers 2]
Acceptance (issue 18): PSI at 1,000,000 people <= 1.25x the X25519 floor.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from itertools import repeat
from multiprocessing import get_context

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from crypto.psi import PsiKey, hash_to_points, match

SILO_COVERAGE = (0.97, 0.93, 0.95)  # the generator's defaults (simulations/data/population.py)
OUTSIDERS = 0.03
SLICES = 8  # tasks per party and step: the interleaving's granularity
CHUNK = 8192  # points per pool job, for the PSI and the floor alike
FLOOR_POOL = 200_000  # random points, reused cyclically: the same cost per exchange


def _phones(start: int, n: int) -> list[str]:
    return [f"+86{13_000_000_000 + i}" for i in range(start, start + n)]


def _floor(secret: bytes, blob: bytes) -> int:
    key = X25519PrivateKey.from_private_bytes(secret)
    load = X25519PublicKey.from_public_bytes
    for i in range(0, len(blob), 32):
        key.exchange(load(blob[i : i + 32]))
    return len(blob) // 32


def _hash_blind(secret: bytes, ids: list[str]) -> bytes:
    """A party's own set: hash, then blind without the received-point check."""
    return PsiKey(secret).blind(hash_to_points(ids), from_peer=False).tobytes()


def _blind_received(secret: bytes, blob: bytes) -> bytes:
    """A peer's points: checked (canonical, on the curve), then blinded."""
    return PsiKey(secret).blind(np.frombuffer(blob, np.uint8).reshape(-1, 32)).tobytes()


def _random_points(n: int) -> bytes:
    raw = bytearray(os.urandom(32 * n))
    for i in range(31, len(raw), 32):
        raw[i] &= 0x7F
    return bytes(raw)


def _split(items, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _slices(items, k: int) -> list:
    return _split(items, max(1, -(-len(items) // k)))


class Timer:
    """PSI tasks and floor slices, alternating; running totals printed as they go."""

    def __init__(self, pool: Executor, total_ops: int) -> None:
        self.pool, self.total = pool, total_ops
        self.group_s = self.floor_s = 0.0
        self.ops = self.floor_ops = 0
        self.x_secret = X25519PrivateKey.generate().private_bytes_raw()
        self.points = _random_points(FLOOR_POOL)
        list(pool.map(_floor, repeat(self.x_secret, 4), [self.points[:3200]] * 4))  # warm up

    def task(self, fn, secret: bytes, chunks: list, ops: int) -> bytes:
        t = time.perf_counter()
        out = b"".join(self.pool.map(fn, repeat(secret), chunks))
        self.group_s += time.perf_counter() - t
        self.ops += ops
        self.floor(ops)
        return out

    def floor(self, count: int) -> None:
        blobs = []
        for start in range(0, count, CHUNK):
            c = min(CHUNK, count - start)
            off = 32 * ((self.floor_ops + start) % (FLOOR_POOL - CHUNK))
            blobs.append(self.points[off : off + 32 * c])
        t = time.perf_counter()
        self.floor_ops += sum(self.pool.map(_floor, repeat(self.x_secret), blobs))
        self.floor_s += time.perf_counter() - t

    def progress(self) -> None:
        print(f"    {self.ops:,}/{self.total:,} mults: PSI {self.group_s:.1f} s, floor "
              f"{self.floor_s:.1f} s, ratio so far {self.group_s / self.floor_s:.3f}", flush=True)


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

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        timer = Timer(pool, ops)
        # 1. Every party hashes and blinds its own set.
        own = b"".join(timer.task(_hash_blind, a.secret, _split(part, CHUNK), len(part))
                       for part in _slices(authority, SLICES))
        timer.progress()
        blinded = []
        for k, s in enumerate(silos):
            blinded.append(b"".join(timer.task(_hash_blind, b[k].secret, _split(part, CHUNK),
                                               len(part)) for part in _slices(s, SLICES)))
        timer.progress()
        # 2. Each silo blinds the authority's points again, the authority blinds the silo's.
        doubled, theirs = [], []
        for k in range(len(silos)):
            for blob, secret, out in ((own, b[k].secret, doubled), (blinded[k], a.secret, theirs)):
                parts = _slices(_split(blob, 32 * CHUNK), SLICES)
                out.append(b"".join(timer.task(_blind_received, secret, chunks,
                                               sum(len(c) for c in chunks) // 32)
                                    for chunks in parts))
            timer.progress()
        # 3. The authority matches (no floor counterpart: it is part of the PSI's cost).
        t = time.perf_counter()
        matched = []
        for k in range(len(silos)):
            i, _ = match(np.frombuffer(doubled[k], np.uint8).reshape(-1, 32),
                         np.frombuffer(theirs[k], np.uint8).reshape(-1, 32))
            matched.append(len(i))
        timer.group_s += time.perf_counter() - t
    expected = [len(set(s) & set(authority)) for s in silos]
    assert matched == expected, (matched, expected)
    assert timer.ops == timer.floor_ops == ops
    return {"n": n, "silos": m, "ops": ops, "floor_s": timer.floor_s,
            "group_s": timer.group_s, "ratio": timer.group_s / timer.floor_s}


def per_op(sample: int = 4000, rounds: int = 5) -> dict:
    """Microseconds per operation on one core: the pieces alternated `rounds` times, the
    fastest round of each kept (on a shared machine the minimum is the least disturbed)."""
    from crypto import psi

    ids = _phones(0, sample)
    blob = hash_to_points(ids).tobytes()
    secret = PsiKey().secret
    pieces = {
        "RFC 9380 encode_to_curve (Elligator 2 u only)": lambda: psi._hash_chunk(ids),
        "X25519 blinding, own points (PsiKey.blind)": lambda: psi._multiply(secret, blob, False),
        "X25519 blinding, received point checked": lambda: psi._multiply(secret, blob, True),
        "X25519 exchange (floor)": lambda: _floor(secret, blob),
    }
    best = dict.fromkeys(pieces, float("inf"))
    for _ in range(rounds):
        for name, fn in pieces.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t) / sample * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    print("per operation, one core (us):")
    for k, v in per_op().items():
        print(f"  {k:48s} {v:8.1f}", flush=True)
    for n in args.users:
        print(f"N={n:,}, {args.workers} processes:", flush=True)
        r = run(n, args.workers)
        print(f"N={n:,} silos={r['silos']} scalar mults={r['ops']:,}: Curve25519 PSI "
              f"{r['group_s']:.1f} s, X25519 floor {r['floor_s']:.1f} s, "
              f"ratio {r['ratio']:.3f} (target <= 1.25)", flush=True)


if __name__ == "__main__":
    main()
