"""Red-team attacks 4 and 5 (overview in redteam.py): membership on the scores, leaked secrets.

Membership on the released scores: a loss threshold per label (simulations/analysis/audit.py's
audit turns it into an epsilon lower bound).
Secrets: no party's randomness secret or the pepper in anything another party reads.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from clients.protocol.schema import AUTHORITY
from crypto.secret_random import SECRET_FILE
from server.scores_file import PEPPER_FILE
from simulations.analysis.audit import membership_audit, per_example_loss
from simulations.analysis.redteam_scoring import Truth

# ---- 4. membership on the released scores ----------------------------------------------------


def membership(truth: Truth, per_class: bool = True):
    """Loss-threshold membership inference by whoever receives the scores: training people
    (members) against test people, with the clean labels (simulations/analysis/audit.py).

    `per_class`: one threshold per label (Yeom et al.'s attack with class-dependent
    thresholds): the statistic is a person's loss percentile among all scored people of the
    same label, which the attacker can compute without knowing who is a member. Calibration
    squashes an overfit model's probabilities towards the base rate, which mixes the two
    classes' losses; within a class the order, and with it the memorisation, survives."""
    scored = ~np.isnan(truth.probability)
    loss = np.full(len(truth.y), np.nan)
    loss[scored] = per_example_loss(truth.y[scored].astype(np.float64),
                                    truth.probability[scored])
    if per_class:
        for label in (0, 1):
            same = scored & (truth.y == label)
            loss[same] = rankdata(loss[same]) / max(1, int(same.sum()))
    members = loss[(truth.split == 0) & scored]
    others = loss[(truth.split == 2) & scored]
    return membership_audit(members, others, truth.delta)


# ---- 5. secrets in what others can read ------------------------------------------------------


def party_secrets(keystore: Path | None, parties: Path) -> dict[str, bytes]:
    """Every party's randomness secret (crypto/secret_random.py) and the authority's pepper."""
    found = {}
    places = [p for p in (keystore, *(d for d in Path(parties).iterdir() if d.is_dir()))
              if p is not None]
    pattern = SECRET_FILE.format(party="*")
    for place in places:
        for path in Path(place).glob(pattern):
            found[str(path)] = path.read_bytes()
    pepper = Path(parties) / AUTHORITY / PEPPER_FILE
    if pepper.exists():
        found[str(pepper)] = pepper.read_bytes()
    return found


def secret_leaks(data: bytes, secrets: dict[str, bytes]) -> list[str]:
    """Which secrets appear in `data`: raw, or as hex (either case), or as base64."""
    out = []
    lowered = data.lower()
    for name, secret in secrets.items():
        forms = (secret, secret.hex().encode(), base64.b64encode(secret).rstrip(b"="),
                 base64.urlsafe_b64encode(secret).rstrip(b"="))
        if any(f in data for f in forms) or secret.hex().encode() in lowered:
            out.append(name)
    return out
