"""What the phases of one authority run (server/authority.py) hand each other: the run's
context, the authority's tables, the training plan, the trained model and the scores. Each
phase's signature names which of them it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.model import ModelSpec
from crypto.at_rest import Keystore
from crypto.secret_random import SecretRandom
from server import scoring
from server.checkpoint import RunState, TrainState
from server.config import AuthorityConfig
from server.dp_guardrails import Guardrail
from server.federation import Federation
from server.ledger import Ledger
from server.privacy import PrivacyPlan
from server.split import Split
from server.training import TrainResult


@dataclass(frozen=True)
class RunContext:
    """What every phase of one run works with: the federation, the configuration, where the
    run's files go, and the authority's keystore, ledger and secret streams."""

    fed: Federation
    cfg: AuthorityConfig
    config: dict  # cfg flattened: what the run key and a resumed checkpoint are checked against
    data_dir: Path
    out_dir: Path
    ledger: Ledger
    store: Keystore | None
    random: SecretRandom


@dataclass(frozen=True)
class Tables:
    """The authority's own table and what the silos said on connecting."""

    ids: pd.Series
    labels: np.ndarray
    gate: pd.DataFrame  # eligibility: status, reason codes and words, per authority row
    info: dict  # per silo: its row count and model inputs


@dataclass(frozen=True)
class Plan:
    """What training starts from: the run fixed before it (alignment, split, the labels the
    gradients see), the state to resume, and the privacy plan and model that follow."""

    run: RunState
    state: TrainState | None  # None: a fresh start
    split: Split
    y: np.ndarray  # the clean labels of every aligned position
    privacy: PrivacyPlan
    spec: ModelSpec
    inputs: dict[str, int]  # each silo's model inputs
    reasons: int  # reason codes asked of the silos (0: none)
    # Why the run may not learn, any model (server/run_plan.py `run_guardrails`): logged, and
    # recorded in authority.json and metrics.json `guardrails`.
    guardrails: tuple[Guardrail, ...] = ()


@dataclass(frozen=True)
class Trained:
    """Training's result, the calibration fitted on validation people, and the privacy
    spent by both (read before the privacy plan closes)."""

    result: TrainResult
    calibrate: scoring.Platt
    privacy_summary: dict


@dataclass(frozen=True)
class Scored:
    """The scores as written, and what the outputs say about them."""

    p: np.ndarray  # the calibrated probability of every aligned position
    tier: np.ndarray
    gate: pd.DataFrame  # the eligibility gate of every aligned position
    eligible: np.ndarray
    ref_hash: str
    with_reasons: bool
