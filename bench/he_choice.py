"""Additively homomorphic encryption for vertical SecureBoost (issue 20): measure before choosing.

The authority (label holder) encrypts each row's binary-logloss gradient g and hessian h; a silo
returns, for the rows of a tree node, the encrypted sums of g and h per (feature, bin); the
authority decrypts them and picks the split. This script times, on one core and at 128-bit
security, each candidate's pieces for N rows, F features per silo and B = 32 bins:

- keygen; encrypting the N (g, h) pairs; the silo's per-(feature, bin) sums over all N rows (a
  root node); decrypting the 2 F B sums; bytes sent each way; the error of the decrypted sums
  against float64;
- then extrapolates to a tree (5 levels of histograms, the subtraction trick: below the root
  only the smaller child, <= N/2 rows) and to 50 trees with 3 silos on 2 cores.

Candidates (each skipped if its package is not importable):

- phe (python-paillier), Paillier n = 3072 bits (128-bit security, NIST SP 800-57): g and h
  packed as signed fixed-point integers into one plaintext (the FATE trick), one ciphertext a
  row; a silo multiplies ciphertexts modulo n^2 (gmpy2) per bin.
- lightphe, Paillier at the same size (its own key generation and arithmetic).
- tenseal (Microsoft SEAL), BFV, N = 8192, SEAL's 128-bit coefficient modulus (218 bits), a
  ~40-bit batching plaintext modulus: SIMD rows of 4096 slots, g in the first row and h in the
  second. A silo routes each row to the slot class of its bin with rotations and 0/1 plaintext
  masks, folds each class with rotations and packs 128 (feature, bin-block) results a
  ciphertext; every slot the authority decrypts is a bin sum or zero.
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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


# ---- BFV (tenseal's SEAL) ------------------------------------------------------------------

RING = 8192
ROW = RING // 2  # slots in each of the two batching rows
FIXED = 20  # fixed-point fraction bits: |sum| 2^20 < 2^37 < t/2 for N <= 100,000
FOLDS = int(math.log2(ROW // BINS))  # rotations folding 4096 slots onto 32 classes


class Bfv:
    """SEAL BFV context, keys and the silo's histogram routine (benchmark version)."""

    def __init__(self) -> None:
        import tenseal.sealapi as s

        self.s = s
        parms = s.EncryptionParameters(s.SCHEME_TYPE.BFV)
        parms.set_poly_modulus_degree(RING)
        parms.set_coeff_modulus(s.CoeffModulus.BFVDefault(RING, s.SEC_LEVEL_TYPE.TC128))
        parms.set_plain_modulus(s.PlainModulus.Batching(RING, 40))
        self.t = parms.plain_modulus().value()
        self.ctx = s.SEALContext(parms, True, s.SEC_LEVEL_TYPE.TC128)
        kg = s.KeyGenerator(self.ctx)
        self.sk = kg.secret_key()
        self.pk = s.PublicKey()
        kg.create_public_key(self.pk)
        self.gk = s.GaloisKeys()
        kg.create_galois_keys(self.gk)  # power-of-two steps: step 1 and the folds
        self.enc = s.Encryptor(self.ctx, self.pk)
        self.dec = s.Decryptor(self.ctx, self.sk)
        self.ev = s.Evaluator(self.ctx)
        self.be = s.BatchEncoder(self.ctx)

    def plain(self, slots: np.ndarray) -> Any:
        p = self.s.Plaintext()
        self.be.encode((slots % self.t).astype(np.uint64).tolist(), p)
        return p

    def encrypt(self, g: np.ndarray, h: np.ndarray) -> list[Any]:
        """Chunks of 4096 rows: g fixed-point in row 0, h in row 1."""
        gi = np.rint(g * 2.0**FIXED).astype(np.int64)
        hi = np.rint(h * 2.0**FIXED).astype(np.int64)
        out = []
        for lo in range(0, len(g), ROW):
            slots = np.zeros(RING, dtype=np.int64)
            k = min(ROW, len(g) - lo)
            slots[:k], slots[ROW : ROW + k] = gi[lo : lo + k], hi[lo : lo + k]
            ct = self.s.Ciphertext()
            self.enc.encrypt(self.plain(slots), ct)
            out.append(ct)
        return out

    def rotate(self, ct: Any, step: int) -> Any:
        out = self.s.Ciphertext()
        self.ev.rotate_rows(ct, step, self.gk, out)
        return out

    def ntt(self, ct: Any) -> Any:
        out = self.s.Ciphertext()
        self.ev.transform_to_ntt(ct, out)
        return out

    def mask_times(self, ct_ntt: Any, slots: np.ndarray) -> Any:
        """ct * mask with both in NTT form: 3x cheaper than SEAL's multiply_plain on
        coefficient-form operands, which transforms the ciphertext for every mask."""
        p = self.plain(slots)
        pn = self.s.Plaintext()
        self.ev.transform_to_ntt(p, ct_ntt.parms_id(), pn)
        out = self.s.Ciphertext()
        self.ev.multiply_plain(ct_ntt, pn, out)
        return out

    def histograms(self, cts: list[Any], bins: np.ndarray) -> list[Any]:
        """Per-(feature, bin) sums of g and h: F x 32 results packed 128 to a ciphertext.

        Row at slot p with bin b must reach a slot j = b (mod 32): rotating left by
        s = (p - b) mod 32 puts it there, so for each chunk the silo makes its 32 rotations
        (31 rotations by one step) and, for each feature, adds each rotation times the 0/1 mask
        of the rows it routes. Folding by 2048, ..., 32 then sums each class into slot b.
        """
        ev, f = self.ev, bins.shape[0]
        acc: list[Any] = [None] * f
        for c, ct in enumerate(cts):
            lo = c * ROW
            k = min(ROW, bins.shape[1] - lo)
            rot = [ct]
            for _ in range(BINS - 1):
                rot.append(self.rotate(rot[-1], 1))
            rot_ntt = [self.ntt(r) for r in rot]
            p = np.arange(k)
            for fi in range(f):
                b = bins[fi, lo : lo + k]
                s_of = (p - b) % BINS
                masks = np.zeros((BINS, ROW), dtype=np.int64)
                masks[s_of, (p - s_of) % ROW] = 1
                for s_ in range(BINS):
                    if not masks[s_].any():
                        continue
                    term = self.mask_times(rot_ntt[s_], np.tile(masks[s_], 2))
                    if acc[fi] is None:
                        acc[fi] = term
                    else:
                        ev.add_inplace(acc[fi], term)
        per_ct = ROW // BINS
        packed: list[Any] = []
        for fi in range(f):
            x = acc[fi]
            ev.transform_from_ntt_inplace(x)  # BFV rotates coefficient-form ciphertexts only
            for k in range(FOLDS):
                ev.add_inplace(x, self.rotate(x, ROW >> (k + 1)))
            # Keep block fi % 128 only: every other slot of the output is zero.
            block = np.zeros(ROW, dtype=np.int64)
            block[(fi % per_ct) * BINS : (fi % per_ct + 1) * BINS] = 1
            x = self.mask_times(self.ntt(x), np.tile(block, 2))
            if fi % per_ct == 0:
                packed.append(x)
            else:
                ev.add_inplace(packed[-1], x)
        for x in packed:
            ev.transform_from_ntt_inplace(x)
        return packed

    def decrypt_sums(self, packed: list[Any], f: int) -> tuple[np.ndarray, np.ndarray]:
        slots = []
        for ct in packed:
            p = self.s.Plaintext()
            self.dec.decrypt(ct, p)
            v = np.array(self.be.decode_int64(p), dtype=np.int64)
            slots.append(v)
        per_ct = ROW // BINS
        g = np.zeros((f, BINS))
        h = np.zeros((f, BINS))
        for fi in range(f):
            v = slots[fi // per_ct]
            o = (fi % per_ct) * BINS
            g[fi] = v[o : o + BINS] / 2.0**FIXED
            h[fi] = v[ROW + o : ROW + o + BINS] / 2.0**FIXED
        return g, h

    def size(self, ct: Any) -> int:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "ct")
            ct.save(path)
            return os.path.getsize(path)


def bench_bfv(g: np.ndarray, h: np.ndarray, bins: np.ndarray) -> Result:
    res = Result("tenseal (SEAL)", "BFV N=8192, t~2^40", version("tenseal"))
    t = cpu()
    bfv = Bfv()
    res.keygen_s = cpu() - t
    t = cpu()
    cts = bfv.encrypt(g, h)
    res.encrypt_s = cpu() - t
    t = cpu()
    packed = bfv.histograms(cts, bins)
    res.silo_s = cpu() - t
    budget = min(bfv.dec.invariant_noise_budget(ct) for ct in packed)
    t = cpu()
    gs, hs = bfv.decrypt_sums(packed, bins.shape[0])
    res.decrypt_s = cpu() - t
    res.bytes_to_silo = sum(bfv.size(ct) for ct in cts)
    res.bytes_to_authority = sum(bfv.size(ct) for ct in packed)
    res.max_err_g = float(np.abs(gs - true_sums(g, bins)).max())
    res.max_err_h = float(np.abs(hs - true_sums(h, bins)).max())
    res.notes.append(f"noise budget left after the silo's work: {budget} bits")
    # Per-operation costs, for the level model below.
    ct = cts[0]
    mask = np.tile((np.arange(ROW) % BINS == 0).astype(np.int64), 2)
    t = cpu()
    for _ in range(20):
        ct_ntt = bfv.ntt(bfv.rotate(ct, 1))
    rot = (cpu() - t) / 20  # a rotation and its NTT, as the routing step uses them
    t = cpu()
    for _ in range(20):
        bfv.mask_times(ct_ntt, mask)
    mul = (cpu() - t) / 20
    enc_ct = res.encrypt_s / len(cts)
    res.notes.append(
        f"per op: rotate+NTT {rot * 1e3:.1f} ms, mask encode+NTT+multiply {mul * 1e3:.1f} ms, "
        f"encrypt {enc_ct * 1e3:.1f} ms a 4096-row chunk"
    )
    res.tree_s = bfv_tree(
        len(g), bins.shape[0], rot, mul, enc_ct, res.decrypt_s / len(packed), res.silo_s
    )
    res.notes.append(
        f"tree model: {bfv_tree(len(g), bins.shape[0], rot, mul, enc_ct, 0.0):.0f} core-s from "
        f"per-op times alone, {res.tree_s:.0f} scaled to the measured root level"
    )
    return res


def bfv_tree(
    rows: int, f: int, rot: float, mul: float, enc_ct: float, dec_ct: float, root: float = 0.0
) -> float:
    """Core-seconds of one tree: the authority re-encrypts each level's computed rows grouped by
    node (chunks never mix many nodes), so a node's masks touch only its own chunks. The op
    counts come from the per-op times; with `root` (a measured root level) each level is scaled
    by measured / modelled root, which charges the silo's Python overhead (building masks) too."""

    def silo(level: int) -> tuple[float, int]:
        nodes = 1 if level == 0 else 2 ** (level - 1)  # smaller children only
        level_rows = rows if level == 0 else rows / 2
        chunks = math.ceil(level_rows / ROW) + (nodes - 1)
        pairs = f * nodes
        cost = chunks * (BINS - 1) * rot + f * chunks * BINS * mul + pairs * (FOLDS * rot + mul)
        return cost, chunks

    scale = root / silo(0)[0] if root else 1.0
    total = 0.0
    for level in range(LEVELS):
        cost, chunks = silo(level)
        outs = math.ceil(f * (2 ** max(level - 1, 0)) / (ROW // BINS))
        total += chunks * enc_ct + SILOS * (scale * cost + outs * dec_ct)
    return total


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
    # Same routing design as BFV: twice the chunks (g and h apart), same op counts per chunk.
    res.tree_s = 2 * bfv_tree(len(g), bins.shape[0], rot, mul, res.encrypt_s / len(cts), 0.0)
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
