"""Additively homomorphic encryption for vertical SecureBoost (issue 20): measure before choosing.

The authority (label holder) encrypts each row's binary-logloss gradient g and hessian h; a silo
returns, for the rows of a tree node, the encrypted sums of g and h per (feature, bin); the
authority decrypts them and picks the split. This script times, on one core and at 128-bit
security, each candidate's pieces for N rows, F features per silo and B = 32 bins:

- keygen; encrypting the N (g, h) pairs; the silo's per-(feature, bin) sums over all N rows (a
  root node); decrypting the 2 F B sums; bytes sent each way; the error of the decrypted sums
  against float64;
- then a tree (5 levels of histograms, the subtraction trick: below the root only the smaller
  child, <= N/2 rows), measured for BFV and extrapolated for the others, and 50 trees with 3
  silos on 2 cores.

Candidates (each skipped if its package is not importable):

- phe (python-paillier), Paillier n = 3072 bits (128-bit security, NIST SP 800-57): g and h
  packed as signed fixed-point integers into one plaintext (the FATE trick), one ciphertext a
  row; a silo multiplies ciphertexts modulo n^2 (gmpy2) per bin.
- lightphe, Paillier at the same size (its own key generation and arithmetic).
- tenseal (Microsoft SEAL), BFV through crypto/he.py: N = 8192, SEAL's 128-bit coefficient
  modulus (218 bits), a ~40-bit batching plaintext modulus, 4096 rows a ciphertext (g in one
  batching row, h in the other); a silo routes rows to their bin's slot class with rotations
  and 0/1 masks and folds (crypto/he.py says how). All 5 levels of a tree are run: the root
  over N rows, then 1, 2, 4, 8 smaller children sharing N/2 rows, each node's rows encrypted
  apart (the authority re-encrypts grouped by node every level).
- tenseal CKKS primitives at the same ring size, for the same design (not run end to end).

Times are CPU seconds of this process (time.process_time), so other load on the shared machine
inflates them less than wall time would; run it alone on one core:

    taskset -c 1 /work/he-venv/bin/python bench/he_choice.py --rows 100000 [--features 10]
        [--only phe,lightphe,bfv,ckks] [--paillier-sample 200]

Paillier encryption of all N rows would take many minutes, so it is timed on --paillier-sample
rows and scaled; the silo's sums do run over all N rows, on ciphertexts made with a small pool
of reused randomisers (identical arithmetic cost, insecure: benchmark only).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The scratch venv holding the candidates has no fedscore install: import crypto/ from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from crypto import he

BINS = 32
TREES = 50
LEVELS = 5  # depth 5: root + 4 levels of histograms
SILOS = 3
CORES = 2


@dataclass
class Result:
    library: str
    scheme: str
    version: str
    keygen_s: float = math.nan
    encrypt_s: float = math.nan  # all N pairs (scaled from a sample where noted)
    silo_s: float = math.nan  # root-node histograms, F features x 32 bins, all N rows
    decrypt_s: float = math.nan  # the 2 F B sums
    bytes_to_silo: int = 0
    bytes_to_authority: int = 0
    max_err_g: float = math.nan
    max_err_h: float = math.nan
    tree_s: float = math.nan  # extrapolated core-seconds of one tree, all silos
    notes: list[str] = field(default_factory=list)

    def fifty_trees_wall(self) -> float:
        """Lower bound on wall time: 50 trees' core-seconds spread perfectly on 2 cores."""
        return TREES * self.tree_s / CORES


def cpu() -> float:
    return time.process_time()


def gradients(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Binary-logloss gradients at a random score: g = p - y in (-1, 1), h = p(1-p) in (0, 1/4]."""
    p = 1.0 / (1.0 + np.exp(-rng.normal(-1.4, 1.0, rows)))
    y = rng.random(rows) < p
    return p - y, p * (1.0 - p)


def true_sums(values: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Float64 per-(feature, bin) sums: shape (F, B)."""
    return np.stack([np.bincount(b, weights=values, minlength=BINS) for b in bins])


def version(dist: str) -> str:
    from importlib.metadata import version as v

    return v(dist)


# ---- Paillier (phe) --------------------------------------------------------------------------

PAILLIER_BITS = 3072
FRAC = 40  # fixed-point fraction bits of g and h
SLOT = 64  # bits of the h field in the packed plaintext: |sum h| * 2^40 < 2^57 for N < 2^17


def pack(g: np.ndarray, h: np.ndarray) -> list[int]:
    """(g, h) -> round(g 2^40) 2^64 + round(h 2^40): h >= 0 so the sum unpacks exactly."""
    gi = np.rint(g * 2.0**FRAC).astype(np.int64)
    hi = np.rint(h * 2.0**FRAC).astype(np.int64)
    return [(int(a) << SLOT) + int(b) for a, b in zip(gi, hi, strict=True)]


def unpack(m: int, n: int) -> tuple[float, float]:
    """Signed plaintext modulo n -> (sum g, sum h)."""
    if m > n // 2:
        m -= n
    hs = m & ((1 << SLOT) - 1)
    return ((m - hs) >> SLOT) / 2.0**FRAC, hs / 2.0**FRAC


def bench_phe(g: np.ndarray, h: np.ndarray, bins: np.ndarray, sample: int) -> Result:
    import gmpy2
    from phe import paillier
    from phe.paillier import EncryptedNumber

    res = Result("phe (python-paillier)", f"Paillier {PAILLIER_BITS}", version("phe"))
    t = cpu()
    pub, priv = paillier.generate_paillier_keypair(n_length=PAILLIER_BITS)
    res.keygen_s = cpu() - t
    n, nsq = pub.n, pub.nsquare
    m = pack(g, h)
    t = cpu()
    for x in m[:sample]:
        pub.raw_encrypt(x)
    per_row = (cpu() - t) / sample
    res.encrypt_s = per_row * len(m)
    # The key holder may encrypt with the CRT (r^n mod p^2 and mod q^2): what an authority
    # would do; phe does not offer it.
    p, q = gmpy2.mpz(priv.p), gmpy2.mpz(priv.q)
    psq, qsq = p * p, q * q
    qsq_inv = gmpy2.invert(qsq, psq)
    t = cpu()
    for x in m[:sample]:
        r = gmpy2.mpz(pub.get_random_lt_n())
        rp, rq = gmpy2.powmod(r, n, psq), gmpy2.powmod(r, n, qsq)
        rn = rq + qsq * ((rp - rq) * qsq_inv % psq)
        (1 + n * x) * rn % nsq
    crt_row = (cpu() - t) / sample
    res.notes.append(
        f"encryption timed on {sample} rows: {per_row * 1e3:.1f} ms/row phe, "
        f"{crt_row * 1e3:.1f} ms/row with the key holder's CRT"
    )
    # Ciphertexts for the silo step: a pool of 64 randomisers reused (same cost to add).
    pool = [gmpy2.mpz(pub.raw_encrypt(0)) for _ in range(64)]
    cts = [(1 + n * x) * pool[i % 64] % nsq for i, x in enumerate(m)]
    t = cpu()
    sums = []
    for fb in bins:
        acc = [gmpy2.mpz(1)] * BINS
        for c, b in zip(cts, fb.tolist(), strict=True):
            acc[b] = acc[b] * c % nsq
        sums.append(acc)
    res.silo_s = cpu() - t
    t = cpu()
    dec = [[unpack(priv.raw_decrypt(int(c)), n) for c in row] for row in sums]
    res.decrypt_s = cpu() - t
    ct_bytes = (nsq.bit_length() + 7) // 8
    res.bytes_to_silo = ct_bytes * len(m)
    res.bytes_to_authority = ct_bytes * bins.shape[0] * BINS
    gs = np.array([[d[0] for d in row] for row in dec])
    hs = np.array([[d[1] for d in row] for row in dec])
    res.max_err_g = float(np.abs(gs - true_sums(g, bins)).max())
    res.max_err_h = float(np.abs(hs - true_sums(h, bins)).max())
    # phe's own EncryptedNumber addition, for scale: the object overhead of the library API.
    a = EncryptedNumber(pub, int(cts[0]), 0)
    t = cpu()
    for c in cts[1:2001]:
        a = a + EncryptedNumber(pub, int(c), 0)
    api_add = (cpu() - t) / 2000
    res.notes.append(
        f"silo: {res.silo_s / (len(m) * bins.shape[0]) * 1e6:.1f} us per row-feature as "
        f"gmpy2 mulmod, {api_add * 1e6:.1f} us through phe's EncryptedNumber +"
    )
    res.tree_s = paillier_tree(crt_row * len(m), res.silo_s, res.decrypt_s)
    return res


def computed_nodes() -> int:
    """Nodes whose histograms a tree computes: the root, then the smaller child of each pair
    (the sibling's is the parent's minus it): 1 + 1 + 2 + 4 + 8 = 2^(L-1) at depth 5."""
    return 2 ** (LEVELS - 1)


def paillier_tree(encrypt: float, silo_root: float, decrypt_root: float) -> float:
    """Core-seconds of one tree: encrypt once, the root over N rows and each lower level over
    <= N/2 rows (smaller children), decrypt every computed node's sums."""
    silo = silo_root * (1 + 0.5 * (LEVELS - 1)) + decrypt_root * computed_nodes()
    return encrypt + SILOS * silo


# ---- lightphe ------------------------------------------------------------------------------


def bench_lightphe(g: np.ndarray, h: np.ndarray, bins: np.ndarray, sample: int) -> Result:
    from lightphe.cryptosystems.Paillier import Paillier

    res = Result("lightphe", f"Paillier {PAILLIER_BITS}", version("lightphe"))
    t = cpu()
    cs = Paillier(key_size=PAILLIER_BITS)
    res.keygen_s = cpu() - t
    n = cs.keys["public_key"]["n"]
    res.notes.append(f"its keygen gave n of {n.bit_length()} bits (asked {PAILLIER_BITS})")
    m = [x % n for x in pack(g, h)]
    k = max(sample // 10, 5)
    t = cpu()
    cts = [cs.encrypt(x) for x in m[:k]]
    per_row = (cpu() - t) / k
    res.encrypt_s = per_row * len(m)
    t = cpu()
    acc = cts[0]
    for c in cts[1:]:
        acc = cs.add(acc, c)
    per_add = (cpu() - t) / (k - 1)
    res.silo_s = per_add * len(m) * bins.shape[0]
    t = cpu()
    got = unpack(cs.decrypt(acc), n)
    res.decrypt_s = (cpu() - t) * bins.shape[0] * BINS
    res.max_err_g = abs(got[0] - float(g[:k].sum()))
    res.max_err_h = abs(got[1] - float(h[:k].sum()))
    res.notes.append(f"timed on {k} rows and scaled; error over those {k} rows only")
    res.tree_s = paillier_tree(res.encrypt_s, res.silo_s, res.decrypt_s)
    return res


# ---- BFV (tenseal's SEAL, through crypto/he.py) ---------------------------------------------

RING = he.HeParams().ring
ROW = he.HeParams().row_slots  # slots in each of the two batching rows
FOLDS = int(math.log2(ROW // BINS))  # rotations folding 4096 slots onto 32 classes


@dataclass(frozen=True)
class OpTimes:
    """CPU seconds of the routing design's operations on one 4096-slot ciphertext."""

    rotate: float  # a one-step rotation, plus the NTT the masks need (BFV)
    mask: float  # encode a 0/1 mask, transform it, multiply

    def level(self, rows: float, f: int, nodes: int, per_ct: int = ROW) -> float:
        """One silo level's operation cost, nodes' rows in their own ciphertexts."""
        chunks = nodes * math.ceil(rows / nodes / per_ct)
        return chunks * (BINS - 1) * self.rotate + f * chunks * BINS * self.mask + (
            f * nodes * (FOLDS * self.rotate + self.mask)
        )


def level_nodes(level: int, rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of the nodes a level computes: the root, then the smaller child of each
    pair (the sibling's histogram is the parent's minus it), N/2 rows among 2^(level-1)."""
    if level == 0:
        return [np.arange(rows)]
    half = rng.permutation(rows)[: rows // 2]
    return np.array_split(half, 2 ** (level - 1))


def bfv_ops(keys: he.SecretHe, pairs: he.EncryptedPairs) -> OpTimes:
    import tenseal.sealapi as s

    pub = keys.public
    ev, enc = s.Evaluator(pub.context), s.BatchEncoder(pub.context)
    ct = pairs.chunks[0]
    t = cpu()
    for _ in range(20):
        out, ntt = s.Ciphertext(), s.Ciphertext()
        ev.rotate_rows(ct, 1, pub.galois_keys, out)
        ev.transform_to_ntt(out, ntt)
    rotate = (cpu() - t) / 20
    mask = (np.arange(RING) % BINS == 0).astype(np.uint64).tolist()
    t = cpu()
    for _ in range(20):
        p, pn, out = s.Plaintext(), s.Plaintext(), s.Ciphertext()
        enc.encode(mask, p)
        ev.transform_to_ntt(p, ntt.parms_id(), pn)
        ev.multiply_plain(ntt, pn, out)
    return OpTimes(rotate=rotate, mask=(cpu() - t) / 20)


def bench_bfv(g: np.ndarray, h: np.ndarray, bins: np.ndarray) -> Result:
    res = Result("tenseal (SEAL)", "BFV N=8192, t~2^40", version("tenseal"))
    t = cpu()
    keys = he.keygen()
    res.keygen_s = cpu() - t
    pub, rows, f = keys.public, len(g), bins.shape[0]
    rng = np.random.default_rng(1)
    tree = 0.0
    for level in range(LEVELS):
        enc = silo = dec = 0.0
        for idx in level_nodes(level, rows, rng):
            t = cpu()
            pairs = he.encrypt_pairs(pub, g=g[idx], h=h[idx])  # re-encrypted grouped by node
            enc += cpu() - t
            t = cpu()
            sums = he.bin_sums(pub, pairs=pairs, bins=bins[:, idx], mask=np.ones(len(idx), bool))
            silo += cpu() - t
            t = cpu()
            got_g, got_h = he.decrypt_sums(keys, sums=sums)
            dec += cpu() - t
            if level == 0:
                res.bytes_to_silo = sum(_ser(c) for c in pairs.chunks)
                res.bytes_to_authority = sum(_ser(c) for c in sums.chunks)
                res.max_err_g = float(np.abs(got_g - true_sums(g, bins)).max())
                res.max_err_h = float(np.abs(got_h - true_sums(h, bins)).max())
                ops = bfv_ops(keys, pairs)
        if level == 0:
            res.encrypt_s, res.silo_s, res.decrypt_s = enc, silo, dec
        nodes = 1 if level == 0 else 2 ** (level - 1)
        res.notes.append(
            f"level {level} ({nodes} node(s), {rows if level == 0 else rows // 2} rows): "
            f"encrypt {enc:.1f} s, silo {silo:.1f} s (op model "
            f"{ops.level(rows if level == 0 else rows / 2, f, nodes):.1f} s), decrypt {dec:.3f} s"
        )
        tree += enc + SILOS * (silo + dec)
    res.tree_s = tree
    res.notes.append(
        f"per op: rotate+NTT {ops.rotate * 1e3:.1f} ms, mask encode+NTT+multiply "
        f"{ops.mask * 1e3:.1f} ms"
    )
    return res


# ---- CKKS primitives (tenseal's SEAL) -------------------------------------------------------


def bench_ckks(g: np.ndarray, h: np.ndarray, bins: np.ndarray) -> Result:
    import tenseal.sealapi as s

    res = Result("tenseal (SEAL)", "CKKS N=8192 [60,40,40,60]", version("tenseal"))
    t = cpu()
    parms = s.EncryptionParameters(s.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(RING)
    parms.set_coeff_modulus(s.CoeffModulus.Create(RING, [60, 40, 40, 60]))
    ctx = s.SEALContext(parms, True, s.SEC_LEVEL_TYPE.TC128)
    kg = s.KeyGenerator(ctx)
    pk = s.PublicKey()
    kg.create_public_key(pk)
    gk = s.GaloisKeys()
    kg.create_galois_keys(gk)
    res.keygen_s = cpu() - t
    enc, ev, ce = s.Encryptor(ctx, pk), s.Evaluator(ctx), s.CKKSEncoder(ctx)
    dec = s.Decryptor(ctx, kg.secret_key())
    scale = 2.0**40
    vals = np.concatenate([g, h])
    t = cpu()
    cts = []
    for lo in range(0, len(vals), ROW):
        p = s.Plaintext()
        ce.encode(vals[lo : lo + ROW].tolist(), scale, p)
        ct = s.Ciphertext()
        enc.encrypt(p, ct)
        cts.append(ct)
    res.encrypt_s = cpu() - t
    ct = cts[0]
    t = cpu()
    for _ in range(20):
        out = s.Ciphertext()
        ev.rotate_vector(ct, 1, gk, out)
    rot = (cpu() - t) / 20
    mask = (np.arange(ROW) % BINS == 0).astype(float).tolist()
    t = cpu()
    for _ in range(20):
        p = s.Plaintext()
        ce.encode(mask, ct.parms_id(), scale, p)
        out = s.Ciphertext()
        ev.multiply_plain(ct, p, out)
        ev.rescale_to_next_inplace(out)  # the mask's scale, one of the two middle primes
    mul = (cpu() - t) / 20
    # Precision of one slot sum over a chunk after a full fold (12 rotations).
    res.bytes_to_silo = sum(_ser(c) for c in cts)
    x = ct  # folded in place: the last use of cts[0]
    for k in range(int(math.log2(ROW))):
        y = s.Ciphertext()
        ev.rotate_vector(x, ROW >> (k + 1), gk, y)
        ev.add_inplace(x, y)
    p = s.Plaintext()
    dec.decrypt(x, p)
    got = np.array(ce.decode_double(p))[0]
    res.max_err_g = abs(float(got) - float(vals[:ROW].sum()))
    res.notes.append(
        f"per op: rotate {rot * 1e3:.1f} ms, encode+multiply_plain+rescale {mul * 1e3:.1f} ms; "
        "g and h need separate ciphertexts (2 x 25 chunks); error: one 4096-slot sum of g"
    )
    # Same routing design as BFV, priced by op counts: g and h in separate ciphertexts, so
    # twice the chunks; the authority's encryption per level grouped by node as for BFV.
    ops, f = OpTimes(rotate=rot, mask=mul), bins.shape[0]
    silo = ops.level(len(g), f, 1, ROW // 2) + sum(
        ops.level(len(g) / 2, f, 2 ** (lv - 1), ROW // 2) for lv in range(1, LEVELS)
    )
    res.tree_s = LEVELS * res.encrypt_s + SILOS * silo
    res.notes.append("tree: op-count model (not run end to end)")
    return res


def _ser(ct: Any) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ct")
        ct.save(path)
        return os.path.getsize(path)


# ---- report ---------------------------------------------------------------------------------

RUNNERS: dict[str, tuple[str, Callable[..., Result]]] = {
    "phe": ("phe", bench_phe),
    "lightphe": ("lightphe", bench_lightphe),
    "bfv": ("tenseal", bench_bfv),
    "ckks": ("tenseal", bench_ckks),
}


def row(r: Result) -> str:
    mb = (r.bytes_to_silo + r.bytes_to_authority) / 1e6
    return (
        f"| {r.library} | {r.scheme} | {r.version} | {r.keygen_s:.2f} | {r.encrypt_s:.1f} | "
        f"{r.silo_s:.1f} | {r.decrypt_s:.3f} | {mb:.1f} | {r.max_err_g:.2e} / {r.max_err_h:.2e} |"
        f" {r.tree_s:.0f} | {r.fifty_trees_wall() / 60:.0f} min |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=10)
    ap.add_argument("--only", default="phe,lightphe,bfv,ckks")
    ap.add_argument("--paillier-sample", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    g, h = gradients(args.rows, rng)
    bins = rng.integers(0, BINS, size=(args.features, args.rows))
    print(
        "| library | scheme | version | keygen s | encrypt N s | silo root hist s | decrypt s |"
        " MB sent | max err sum g / h | tree core-s | 50 trees (2 cores) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    notes = []
    for name in args.only.split(","):
        module, run = RUNNERS[name]
        if importlib.util.find_spec(module) is None:
            print(f"| {name} | not installed |")
            continue
        if run in (bench_phe, bench_lightphe):
            r = run(g, h, bins, args.paillier_sample)
        else:
            r = run(g, h, bins)
        print(row(r), flush=True)
        notes += [f"- {r.library} {r.scheme}: {n}" for n in r.notes]
    print("\n".join(notes))


if __name__ == "__main__":
    main()
