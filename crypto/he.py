"""Encrypted per-bin gradient sums for vertical SecureBoost (issue 20): BFV from Microsoft SEAL.

The authority (label holder) encrypts each row's gradient g and hessian h; a silo, which never
holds the secret key, adds them up per (feature, bin) over the rows of a tree node; the
authority decrypts the sums. bench/he_choice.py measured the candidates and RESULTS.md gives
the reasons for BFV through tenseal's SEAL bindings.

Encoding: 4096 rows per ciphertext, g in batching row 0 and h in batching row 1, each as a
fixed-point integer with `frac_bits` fractional bits (rounded to nearest). A silo routes each
row to a slot whose index is its bin modulo the bin count (a rotation by (slot - bin) mod bins
and a 0/1 plaintext mask), folds every class of slots into its first slot with rotations and
packs the features' bins side by side; every slot the authority decrypts is a bin sum or zero.

Precision: each value is off by at most 2^-(frac_bits+1), so a sum over n rows by at most
n 2^-(frac_bits+1); sums are exact in the ring as long as sum |g| and sum |h| times 2^frac_bits
stay below t/2, which `encrypt_pairs` checks (t is the ~plain_bits-bit plaintext modulus).

Not done here (see RESULTS.md): noise flooding for circuit privacy (the returned ciphertexts
are re-randomised with a fresh encryption of zero but their noise still depends on the silo's
masks), serialisation for the wire, one pass for all nodes of a level.

tenseal is imported when first used: only vertical trees need it, and it loads SEAL.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class HeParams:
    """BFV parameters. ring 8192 with SEAL's 128-bit coefficient modulus (218 bits)."""

    ring: int = 8192
    plain_bits: int = 40
    frac_bits: int = 20
    bins: int = 32

    @property
    def row_slots(self) -> int:
        return self.ring // 2

    def __post_init__(self) -> None:
        if self.bins & (self.bins - 1) or not 2 <= self.bins <= self.row_slots:
            raise ValueError("bins must be a power of two that fits one batching row")


def _seal() -> Any:
    return importlib.import_module("tenseal.sealapi")


@dataclass(frozen=True, kw_only=True)
class PublicHe:
    """What a silo holds: parameters, context, public and rotation keys; no secret key."""

    params: HeParams
    context: Any
    public_key: Any
    galois_keys: Any
    plain_modulus: int

    def steps(self) -> list[int]:
        return rotation_steps(self.params)


@dataclass(frozen=True, kw_only=True)
class SecretHe:
    """The authority's keys: the public part plus the secret key."""

    public: PublicHe
    secret_key: Any = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class EncryptedPairs:
    """Ciphertexts of (g, h) for `rows` rows, 4096 a ciphertext."""

    rows: int
    chunks: list[Any]


@dataclass(frozen=True, kw_only=True)
class EncryptedSums:
    """Packed per-(feature, bin) sums of g and h, `features` x bins of them."""

    features: int
    chunks: list[Any]


def rotation_steps(params: HeParams) -> list[int]:
    """Row rotations a silo uses: one step for routing, halvings down to `bins` for folding."""
    folds = int(math.log2(params.row_slots // params.bins))
    return [1] + [params.row_slots >> (k + 1) for k in range(folds)]


def keygen(*, params: HeParams | None = None) -> SecretHe:
    """Fresh BFV keys at 128-bit security (SEAL's context check refuses weaker parameters)."""
    params = params or HeParams()
    s = _seal()
    parms = s.EncryptionParameters(s.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(params.ring)
    parms.set_coeff_modulus(s.CoeffModulus.BFVDefault(params.ring, s.SEC_LEVEL_TYPE.TC128))
    parms.set_plain_modulus(s.PlainModulus.Batching(params.ring, params.plain_bits))
    context = s.SEALContext(parms, True, s.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ValueError("SEAL rejected the BFV parameters")
    kg = s.KeyGenerator(context)
    public_key = s.PublicKey()
    kg.create_public_key(public_key)
    galois_keys = s.GaloisKeys()
    # A left rotation of the batching rows by k steps is the Galois element 3^k mod 2N.
    elements = [pow(3, k, 2 * params.ring) for k in rotation_steps(params)]
    kg.create_galois_keys(elements, galois_keys)
    public = PublicHe(
        params=params,
        context=context,
        public_key=public_key,
        galois_keys=galois_keys,
        plain_modulus=parms.plain_modulus().value(),
    )
    return SecretHe(public=public, secret_key=kg.secret_key())


def _fixed(values: np.ndarray, frac_bits: int) -> np.ndarray:
    return np.rint(np.asarray(values, dtype=np.float64) * float(1 << frac_bits)).astype(np.int64)


def _plain(pub: PublicHe, slots: np.ndarray) -> Any:
    s = _seal()
    p = s.Plaintext()
    s.BatchEncoder(pub.context).encode((slots % pub.plain_modulus).astype(np.uint64).tolist(), p)
    return p


def encrypt_pairs(pub: PublicHe, *, g: np.ndarray, h: np.ndarray) -> EncryptedPairs:
    """Encrypt per-row (g, h); refuses values whose sums could wrap the plaintext ring."""
    g = np.asarray(g, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    if g.shape != h.shape or g.ndim != 1:
        raise ValueError("g and h must be 1-d arrays of one length")
    if not (np.isfinite(g).all() and np.isfinite(h).all()):
        raise ValueError("g and h must be finite")
    gi, hi = _fixed(g, pub.params.frac_bits), _fixed(h, pub.params.frac_bits)
    bound = max(int(np.abs(gi).sum()), int(np.abs(hi).sum()))
    if 2 * bound >= pub.plain_modulus:
        raise ValueError("sums of these values could wrap the plaintext modulus")
    s = _seal()
    encryptor = s.Encryptor(pub.context, pub.public_key)
    width = pub.params.row_slots
    chunks = []
    for lo in range(0, len(g), width):
        k = min(width, len(g) - lo)
        slots = np.zeros(pub.params.ring, dtype=np.int64)
        slots[:k], slots[width : width + k] = gi[lo : lo + k], hi[lo : lo + k]
        ct = s.Ciphertext()
        encryptor.encrypt(_plain(pub, slots), ct)
        chunks.append(ct)
    return EncryptedPairs(rows=len(g), chunks=chunks)


class _Silo:
    """The evaluator side: rotations and NTT-form mask products."""

    def __init__(self, pub: PublicHe) -> None:
        self.s = _seal()
        self.pub = pub
        self.ev = self.s.Evaluator(pub.context)

    def rotate(self, ct: Any, step: int) -> Any:
        out = self.s.Ciphertext()
        self.ev.rotate_rows(ct, step, self.pub.galois_keys, out)
        return out

    def ntt(self, ct: Any) -> Any:
        out = self.s.Ciphertext()
        self.ev.transform_to_ntt(ct, out)
        return out

    def times_mask(self, ct_ntt: Any, row_mask: np.ndarray) -> Any:
        """ct * mask, the same 0/1 mask on both batching rows; both operands in NTT form."""
        p = _plain(self.pub, np.tile(row_mask.astype(np.int64), 2))
        pn = self.s.Plaintext()
        self.ev.transform_to_ntt(p, ct_ntt.parms_id(), pn)
        out = self.s.Ciphertext()
        self.ev.multiply_plain(ct_ntt, pn, out)
        return out

    def add(self, acc: Any | None, term: Any) -> Any:
        if acc is None:
            return term
        self.ev.add_inplace(acc, term)
        return acc


def bin_sums(
    pub: PublicHe, *, pairs: EncryptedPairs, bins: np.ndarray, mask: np.ndarray
) -> EncryptedSums:
    """A silo's encrypted sums of g and h per (feature, bin) over the rows where `mask` holds.

    bins: (features, rows) integers in [0, params.bins); mask: (rows,) booleans (the node).
    """
    bins = np.asarray(bins)
    mask = np.asarray(mask, dtype=bool)
    nb, width = pub.params.bins, pub.params.row_slots
    if bins.ndim != 2 or bins.shape[1] != pairs.rows or mask.shape != (pairs.rows,):
        raise ValueError("bins must be (features, rows) and mask (rows,) for these pairs")
    if bins.size and (bins.min() < 0 or bins.max() >= nb):
        raise ValueError(f"bins must lie in [0, {nb})")
    silo = _Silo(pub)
    features = bins.shape[0]
    acc: list[Any | None] = [None] * features
    for c, ct in enumerate(pairs.chunks):
        lo = c * width
        rows = np.arange(min(width, pairs.rows - lo))
        rows = rows[mask[lo + rows]]
        if rows.size == 0:
            continue
        routed = [ct]
        for _ in range(nb - 1):
            routed.append(silo.rotate(routed[-1], 1))
        routed_ntt = [silo.ntt(r) for r in routed]
        for f in range(features):
            # Left rotation by s moves slot p to p - s; s = (p - bin) mod nb lands on class bin.
            shift = (rows - bins[f, lo + rows]) % nb
            masks = np.zeros((nb, width), dtype=bool)
            masks[shift, (rows - shift) % width] = True
            for s_ in np.flatnonzero(masks.any(axis=1)):
                acc[f] = silo.add(acc[f], silo.times_mask(routed_ntt[s_], masks[s_]))
    return EncryptedSums(features=features, chunks=_fold_and_pack(silo, acc))


def _fold_and_pack(silo: _Silo, acc: list[Any | None]) -> list[Any]:
    """Fold each feature's slot classes into slots 0..bins-1, keep them in the feature's block
    of the packed output, and re-randomise each output with a fresh encryption of zero."""
    s, pub = silo.s, silo.pub
    nb, width = pub.params.bins, pub.params.row_slots
    per_ct = width // nb
    packed: list[Any] = []
    for f, x in enumerate(acc):
        if f % per_ct == 0:
            packed.append(None)
        if x is None:  # no row of the node: every sum of this feature is 0
            continue
        silo.ev.transform_from_ntt_inplace(x)  # BFV rotates coefficient-form ciphertexts only
        for step in pub.steps()[1:]:
            silo.ev.add_inplace(x, silo.rotate(x, step))
        block = np.zeros(width, dtype=bool)
        block[(f % per_ct) * nb : (f % per_ct + 1) * nb] = True
        packed[-1] = silo.add(packed[-1], silo.times_mask(silo.ntt(x), block))
    encryptor = s.Encryptor(pub.context, pub.public_key)
    out = []
    for x in packed:
        zero = s.Ciphertext()
        encryptor.encrypt_zero(zero)
        if x is None:
            out.append(zero)
            continue
        silo.ev.transform_from_ntt_inplace(x)
        silo.ev.add_inplace(x, zero)
        out.append(x)
    return out


def decrypt_sums(keys: SecretHe, *, sums: EncryptedSums) -> tuple[np.ndarray, np.ndarray]:
    """(sum g, sum h), each (features, bins) float64; raises if the noise budget ran out."""
    s, pub = _seal(), keys.public
    nb, width = pub.params.bins, pub.params.row_slots
    decryptor = s.Decryptor(pub.context, keys.secret_key)
    encoder = s.BatchEncoder(pub.context)
    per_ct = width // nb
    g = np.zeros((sums.features, nb))
    h = np.zeros((sums.features, nb))
    scale = float(1 << pub.params.frac_bits)
    for i, ct in enumerate(sums.chunks):
        if decryptor.invariant_noise_budget(ct) <= 0:
            raise ValueError("noise budget exhausted: the sums cannot be decrypted")
        p = s.Plaintext()
        decryptor.decrypt(ct, p)
        slots = np.asarray(encoder.decode_int64(p), dtype=np.int64)
        for j in range(min(per_ct, sums.features - i * per_ct)):
            g[i * per_ct + j] = slots[j * nb : (j + 1) * nb] / scale
            h[i * per_ct + j] = slots[width + j * nb : width + (j + 1) * nb] / scale
    log.debug("decrypted %d x %d bin sums", sums.features, nb)
    return g, h
