"""What a region and the server agree on (horizontal topology): the messages beyond Flower's
own train/evaluate, the model's inputs, the local plan the server sends and the global model
every region starts from.

The inputs come from a fixed public map of the schema's features (clients/region/data.py
turns a region's table into them); the server needs their names only, to size the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from clients.protocol.model import BottomModel
from clients.protocol.schema import SILO_FEATURES, SILOS

# Queries after training (clients/region/app.py answers them).
PRIVACY = "query.privacy"
PREDICT = "query.predict"


def feature_columns() -> list[tuple[str, str]]:
    """(column, kind) of every feature a region holds, in schema order."""
    return [(f.name, f.kind) for silo in SILOS for f in SILO_FEATURES[silo]]


def input_columns() -> list[str]:
    names = [c for c, _ in feature_columns()]
    return names + [f"{c}__missing" for c in names]


@dataclass(frozen=True)
class LocalSpec:
    hidden: tuple[int, ...] = (32, 16)
    lr: float = 0.003
    batch_size: int = 512
    local_epochs: float = 1.0
    rounds: int = 8
    seed: int = 0
    proximal_mu: float = 0.0
    # Sample-level DP: a target epsilon per region for the whole run (inf = off).
    epsilon: float = math.inf
    delta: float = 0.0  # 0 = 1 / (10 x the region's training customers)
    accountant: str = "prv"
    max_grad_norm: float = 5.0
    cap: float = 0.0  # 0 = the target
    # User-level DP (horizontal.dp=user) is in force: the server clips and noises each region's
    # update, so the region sends its model and nothing else (no loss, AUC, size or steps).
    user_level: bool = False

    @property
    def dp(self) -> bool:
        return math.isfinite(self.epsilon)

    def to_config(self) -> dict:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        out["epsilon"] = self.epsilon if self.dp else -1.0  # Flower records hold no inf
        return out

    @classmethod
    def from_config(cls, cfg: dict) -> LocalSpec:
        eps = float(cfg["epsilon"])
        return cls(
            hidden=tuple(int(h) for h in cfg["hidden"]), lr=float(cfg["lr"]),
            batch_size=int(cfg["batch_size"]), local_epochs=float(cfg["local_epochs"]),
            rounds=int(cfg["rounds"]), seed=int(cfg["seed"]),
            proximal_mu=float(cfg["proximal_mu"]), epsilon=eps if eps > 0 else math.inf,
            delta=float(cfg["delta"]), accountant=str(cfg["accountant"]),
            max_grad_norm=float(cfg["max_grad_norm"]), cap=float(cfg["cap"]),
            user_level=bool(cfg.get("user_level", False)),
        )


def global_model(n_inputs: int, spec: LocalSpec) -> BottomModel:
    """The model every region starts from (the server builds it; same seed, same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed * 1_000_003 + 17)
        return BottomModel(n_inputs, spec.hidden, 1)
