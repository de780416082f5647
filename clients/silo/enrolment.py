"""Enrolment: give every silo an identity key, pin them in a roster, hand each silo its policy.

In a real federation each silo operator makes its identity key in its own keystore and the
operators agree on the roster (compare fingerprints out of band). The simulation plays every
operator, so `enrol` does it for all silos of a parties directory at once: the roster goes to
each silo's directory and to the parties root (the authority's copy), the policy to each silo.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from clients.protocol.reasons import MAX_REASONS
from clients.silo.policy import SiloPolicy
from crypto.roster import ROSTER_FILE, Roster, identity_key, public_hex

log = logging.getLogger(__name__)


def identity_dir(parties_root: Path, silo: str, keystore: Path | None) -> Path:
    """Where a silo's identity key lives: its keystore, else its own directory (0600), the
    same place as its randomness secret (clients/silo/state.py `silo_random`)."""
    return Path(keystore) if keystore is not None else Path(parties_root) / silo


def enrol(parties_root: Path, silos: tuple[str, ...] | list[str], keystore: Path | None,
          policy: SiloPolicy | None = None) -> Roster:
    """Identity keys (made once, kept), the roster in every silo's directory and in the parties
    root, and `policy` (the strict default when None) in every silo's directory."""
    parties_root = Path(parties_root)
    keys = {}
    for silo in silos:
        where = identity_dir(parties_root, silo, keystore)
        where.mkdir(parents=True, exist_ok=True)
        keys[silo] = public_hex(identity_key(where, silo))
    roster = Roster(keys)
    parties_root.mkdir(parents=True, exist_ok=True)
    roster.write(parties_root / ROSTER_FILE)
    for silo in silos:
        (parties_root / silo).mkdir(parents=True, exist_ok=True)
        roster.write(parties_root / silo / ROSTER_FILE)
        (policy or SiloPolicy()).write(parties_root / silo)
    log.info("enrolled %d silos; roster fingerprint %s", len(keys), roster.fingerprint[:16])
    return roster


def policy_for(*, explain: int, secure_sum: bool, concat: bool, kind: str = "mlp",
               min_child_weight: float | None = None) -> SiloPolicy:
    """The policy a simulated silo operator sets to allow what one experiment asks: its reason
    codes, corrections after disputes (the experiment's own dispute flow), its aggregation.

    A tree or scorecard run (`kind`) has no secure sum: every answer goes to the authority per
    silo, so the operator allows plaintext. The SecureBoost trees (`min_child_weight`, given
    for them only) ask the per-bin sums of nodes as small as their children may be: a child
    keeps at least min_child_weight of hessian and one person's hessian is at most 1/4
    (p (1 - p), or under randomised response dq^2 / (q (1 - q)) <= s (1 - s)), so a node holds
    at least 4 x min_child_weight people (80 at the default 20); the operator lowers
    min_group to that when it is below the default, never raises it. A scorecard or tree run
    asks reason codes even at explain.reasons=0 (server/run_plan.py `reasons_asked`: its
    partial logits, or the trees' splits and paths, show the authority as much): the operator
    allows them."""
    min_group = SiloPolicy.min_group
    if min_child_weight is not None:
        min_group = max(1, min(min_group, math.floor(4 * min_child_weight)))
    if kind in ("scorecard", "gbdt"):
        explain = explain or MAX_REASONS
    return SiloPolicy(min_group=min_group, explain=explain, corrections="all",
                      require_secure_sum=secure_sum and kind == "mlp", allow_concat=concat)
