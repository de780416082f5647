"""Identity alignment: PSI with every silo, then one shared row order 0..M-1.

The authority keeps the people every silo holds (the joint intersection), shuffles them into
positions, and tells each silo which of its rows sits at which position. From here on messages
carry positions only. What each party learns is in docs/architecture.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from randomgen import ChaCha

from clients.protocol import messages as m
from crypto.identity import PHONE, IdentifierFormat
from crypto.psi import PsiKey, blinding_pool, hash_to_points, match
from server.federation import Federation, FederationError

log = logging.getLogger(__name__)


class AlignmentError(FederationError):
    """No usable overlap between the parties."""


@dataclass(frozen=True)
class Alignment:
    authority_rows: np.ndarray  # authority table row at each position
    silo_rows: dict[str, np.ndarray]  # silo table row at each position
    overlap: dict[str, int]  # people each silo shares with the authority

    @property
    def size(self) -> int:
        return len(self.authority_rows)


def private_intersections(
    fed: Federation, ids: pd.Series, workers: int = 1,
    id_format: IdentifierFormat = PHONE,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{silo: (authority rows, silo rows)} of the people both hold, via ECDH PSI.

    `id_format`: how the parties normalised their identifiers, named when nobody matches.
    The blind request declares our set size: each silo finishes at most that many points, once
    per run, so the authority cannot probe identifiers beyond its own table."""
    if len(ids) == 0:
        raise AlignmentError("the authority's table holds no identifiers")
    key = PsiKey()
    pending = fed.push(m.PSI_BLIND,
                       {s: m.make_content({"set_size": len(ids)}) for s in fed.silos})
    finishing: dict = {}
    theirs = {}
    with blinding_pool(workers, len(ids)) as pool:
        # Hash and blind our own set while the silos blind theirs (own hash outputs are on
        # the curve by construction: no peer-point check).
        own = key.blind(hash_to_points(ids.to_numpy(), pool=pool), pool=pool, from_peer=False)
        # Pipelined: a silo that has answered gets our points at once and goes on to its
        # second step while we blind its points, instead of everyone waiting for the slowest
        # silo (with three silos on two cores, one of them always runs alone at the end).
        for silo, reply in fed.each(pending):
            points = m.get_array(reply, "points", np.uint8, 2)
            finishing.update(fed.push(m.PSI_FINISH, {str(silo): m.make_content(points=own)}))
            theirs[silo] = key.blind(points, pool=pool)  # checked: canonical, on the curve
    doubled = {s: m.get_array(r, "points", np.uint8, 2)
               for s, r in fed.collect(finishing).items()}
    out = {}
    for silo in fed.silos:
        if len(doubled[silo]) != len(own):
            raise AlignmentError(
                f"silo {silo!r} returned {len(doubled[silo])} points for {len(own)} sent"
            )
        auth_rows, silo_rows = match(doubled[silo], theirs[silo])
        if len(auth_rows) == 0:
            raise AlignmentError(
                f"silo {silo!r} shares no one with the authority; check that both tables hold "
                f"{id_format.describe()} of the same people"
            )
        out[silo] = (auth_rows, silo_rows)
        log.info("PSI with %s: %d people in common", silo, len(auth_rows))
    return out


def joint_order(
    pairs: dict[str, tuple[np.ndarray, np.ndarray]], n_authority: int, rng: np.random.Generator
) -> Alignment:
    """Positions for the people all silos hold, in a random order from `rng`, which must be
    the authority's secret stream (SecretRandom.generator, ChaCha20 keyed by the authority's
    secret): a permutation from the public seed would let every silo map positions back to the
    authority's table order, and through it to the other silos' rows."""
    if not isinstance(rng.bit_generator, ChaCha):
        raise TypeError("joint_order needs the authority's secret stream "
                        "(SecretRandom.generator), not a generator from a public seed")
    silo_row_of: dict[str, np.ndarray] = {}
    present = np.ones(n_authority, dtype=bool)
    for silo, (auth_rows, silo_rows) in pairs.items():
        row_of = np.full(n_authority, -1, dtype=np.int64)
        row_of[auth_rows] = silo_rows
        silo_row_of[silo] = row_of
        present &= row_of >= 0
    joint = np.flatnonzero(present)
    if len(joint) == 0:
        raise AlignmentError(
            "no person is held by every silo; the vertical model needs people all parties know"
        )
    authority_rows = rng.permutation(joint)
    return Alignment(
        authority_rows=authority_rows,
        silo_rows={s: row_of[authority_rows] for s, row_of in silo_row_of.items()},
        overlap={s: len(a) for s, (a, _) in pairs.items()},
    )


def announce(fed: Federation, alignment: Alignment, model_config: dict) -> dict[str, int]:
    """Tell each silo its positions and how to build its model; returns its input widths."""
    positions = np.arange(alignment.size, dtype=np.int64)
    config = {**model_config, "positions": alignment.size}
    replies = fed.exchange(
        m.ALIGN,
        {
            s: m.make_content(config, rows=alignment.silo_rows[s], positions=positions)
            for s in fed.silos
        },
    )
    inputs = {s: int(m.get_config(r)["inputs"]) for s, r in replies.items()}
    if model_config.get("secure"):
        # Relay every silo's masking public key, with its silo's signature, to every silo; the
        # authority cannot derive the pairwise secrets from them (X25519), and each silo checks
        # every key against the roster before using it (crypto/roster.py).
        relayed: dict[str, bytes] = {}
        for s, r in replies.items():
            cfg = m.get_config(r)
            if "mask_public" not in cfg or "mask_signature" not in cfg:
                raise FederationError(f"silo {s!r} sent no signed masking key")
            relayed[f"peer.{s}"] = bytes(cfg["mask_public"])
            relayed[f"sig.{s}"] = bytes(cfg["mask_signature"])
        fed.broadcast(m.PEERS, m.make_content(relayed))
    return inputs
