"""Scoring the red team's attacks (overview in redteam.py): the experiment layer.

An AUC's standard error (the AUC itself is clients/protocol/metrics.py's), balanced accuracy
and the label-DP bound they are held to, and `Truth`: what no party may read (the authority's
labels, its private split, the released scores), used ONLY to score the attacks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.schema import AUTHORITY
from crypto.at_rest import Keystore
from crypto.identity import keyed_refs
from server.labels import load_labels
from server.scores_file import PEPPER_FILE, read_scores
from simulations.data.paths import run_keystore, run_parties


def auc_standard_error(value: float, n1: int, n0: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUC from n1 positives, n0 negatives."""
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    var = (value * (1 - value) + (n1 - 1) * (q1 - value**2) + (n0 - 1) * (q2 - value**2)) \
        / (n1 * n0)
    return math.sqrt(max(var, 0.0))


def balanced_accuracy(y: np.ndarray, guess: np.ndarray) -> float:
    """(TPR + TNR) / 2: a label-DP guarantee bounds this (not plain accuracy, which guessing
    the majority class already makes high)."""
    y, guess = np.asarray(y).astype(bool), np.asarray(guess).astype(bool)
    return float((guess[y].mean() + (~guess[~y]).mean()) / 2)


def label_dp_bound(epsilon: float) -> float:
    """e^eps / (1 + e^eps): the largest balanced accuracy, and the largest AUC, any attack on
    epsilon-label-DP labels can reach in expectation (1 without label DP)."""
    return 1.0 if math.isinf(epsilon) else 1.0 / (1.0 + math.exp(-epsilon))


@dataclass
class Truth:
    """What only the experiment layer knows, per position: the clean label, the authority's
    private split (0 train, 1 val, 2 test), the released probability (NaN when not scored),
    and the authority's table row; and the run's accounted epsilon and delta."""

    y: np.ndarray
    split: np.ndarray
    probability: np.ndarray
    authority_row: np.ndarray
    epsilon: float | None
    delta: float

    @classmethod
    def load(cls, run_dir: Path) -> Truth:
        run_dir = Path(run_dir)
        parties, keys = run_parties(run_dir), run_keystore(run_dir)
        scores = read_scores(run_dir, keys, with_split=True)
        ids, labels = load_labels(parties / AUTHORITY, Keystore(keys) if keys else None)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        authority = json.loads((run_dir / "authority.json").read_text())
        ref_hash = authority["subject_ref"].removeprefix("hmac-")
        pepper = (parties / AUTHORITY / PEPPER_FILE).read_bytes()
        rows = pd.Index(keyed_refs(ids.to_numpy(), pepper, ref_hash)).get_indexer(
            scores["subject_ref"])
        if (rows < 0).any():
            raise ValueError("the scores name people the authority's table does not hold")
        split = pd.Categorical(scores["split"], categories=("train", "val", "test")).codes
        return cls(y=labels[rows].astype(np.int8), split=np.asarray(split, dtype=np.int8),
                   probability=scores["probability"].to_numpy(dtype=np.float64),
                   authority_row=rows.astype(np.int64),
                   # metrics' eps_model of the combined model (server.privacy.model_epsilon,
                   # not imported: it pulls in the training stack)
                   epsilon=(metrics.get("epsilon") or {}).get("model"),
                   delta=float(metrics["delta"]))
