"""Red-team attack 1 (overview in redteam.py): labels from the gradients a silo receives.

Label inference from the gradients a silo receives (Li et al., "Label Leakage and Protection
in Two-party Split Learning", ICLR 2022): the sign of d loss / d contribution, its norm
(the rarer class has the larger |p - y| early on), and, for vector gradients (concat mode),
the direction: cosine to the batch's largest gradient. Under label DP (randomised response,
epsilon e) every attack's balanced accuracy and AUC are at most e^e / (1 + e^e).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulations.analysis.redteam import SiloView


@dataclass
class LabelGuess:
    """Per position the attack saw: a score (higher = more likely a defaulter) and a guess."""

    positions: np.ndarray
    score: np.ndarray
    guess: np.ndarray


def _per_position(positions: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` per distinct position."""
    pos, inverse = np.unique(positions, return_inverse=True)
    total = np.bincount(inverse, weights=values, minlength=len(pos))
    count = np.bincount(inverse, minlength=len(pos))
    return pos, total / count


def _rows(view: SiloView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = view.batches()
    if not batches:
        raise ValueError(f"silo {view.silo} received no gradients")
    positions = np.concatenate([p for p, _ in batches])
    grads = np.concatenate([g.reshape(len(g), -1) for _, g in batches]).astype(np.float64)
    batch = np.concatenate([np.full(len(p), i) for i, (p, _) in enumerate(batches)])
    return positions, grads, batch


def sign_attack(view: SiloView) -> LabelGuess:
    """d loss / d z = p - y (forward-corrected under label DP): a negative gradient means the
    label the authority trained on was 1. Majority of signs over a position's appearances
    (scalar gradients; for vectors, the sum of the columns' signs)."""
    positions, grads, _ = _rows(view)
    pos, score = _per_position(positions, -np.sign(grads).sum(axis=1))
    return LabelGuess(pos, score, score > 0)


def norm_attack(view: SiloView) -> LabelGuess:
    """The norm of the first gradient each position received: early in training p is near
    the base rate for everyone, so a member of the rarer class has the larger |p - y| (Li et
    al.'s norm attack; later, as the model fits, every norm shrinks and the gap with it).
    Scored as an AUC; the guess is the larger side of the largest gap in log-norms."""
    positions, grads, _ = _rows(view)
    pos, first = np.unique(positions, return_index=True)  # batches are in the order received
    score = np.linalg.norm(grads[first], axis=1)
    logs = np.sort(np.log(score + 1e-30))
    cut = logs[np.argmax(np.diff(logs))] if len(logs) > 1 else logs[0]
    return LabelGuess(pos, score, np.log(score + 1e-30) > cut)


def cosine_attack(view: SiloView) -> LabelGuess:
    """Direction (Li et al.'s cosine attack without any known label): in each mini-batch the
    largest gradient is taken to be a defaulter's (the norm attack's insight), and every row is
    scored by its cosine to it; same direction = same label. Mean cosine per position."""
    positions, grads, batch = _rows(view)
    norms = np.linalg.norm(grads, axis=1)
    cos = np.zeros(len(grads))
    for b in np.unique(batch):
        rows = np.flatnonzero(batch == b)
        ref = grads[rows[np.argmax(norms[rows])]]
        denom = norms[rows] * np.linalg.norm(ref)
        cos[rows] = np.where(denom > 0, grads[rows] @ ref / np.where(denom > 0, denom, 1), 0)
    pos, score = _per_position(positions, cos)
    return LabelGuess(pos, score, score > 0)
