"""A silo's bottom model and its local optimiser.

The bottom model g_k maps a silo's features to one logit contribution. No BatchNorm: DP-SGD needs
per-sample gradients, and BatchNorm mixes samples. The last layer starts at zero so every silo
begins by contributing nothing and the authority's bias starts at the prior.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    hidden: tuple[int, ...] = (32, 16)
    lr: float = 0.003
    weight_decay: float = 0.0
    seed: int = 0

    def to_config(self) -> dict:
        return {
            "hidden": list(self.hidden),
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> ModelSpec:
        return cls(
            hidden=tuple(int(h) for h in cfg["hidden"]),
            lr=float(cfg["lr"]),
            weight_decay=float(cfg["weight_decay"]),
            seed=int(cfg["seed"]),
        )


class BottomModel(nn.Module):
    def __init__(self, n_inputs: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        out = nn.Linear(width, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def build(n_inputs: int, spec: ModelSpec, salt: int = 0) -> tuple[BottomModel, torch.optim.Adam]:
    """A freshly initialised model and optimiser; `salt` separates parties sharing a seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed * 1_000_003 + salt)
        model = BottomModel(n_inputs, spec.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return model, opt


class SiloTrainer:
    """A silo's model and optimiser, serialisable into the node's Flower state between messages."""

    def __init__(self, n_inputs: int, spec: ModelSpec, salt: int = 0) -> None:
        self.n_inputs = n_inputs
        self.spec = spec
        self.model, self.opt = build(n_inputs, spec, salt)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict()}, buf)
        return buf.getvalue()

    def load_bytes(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])

    @torch.no_grad()
    def contributions(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        return self.model(torch.from_numpy(x)).numpy().astype(np.float32)

    def replay(self, batches: list[np.ndarray], grads: list[np.ndarray]) -> None:
        """One optimiser step per batch, backpropagating the authority's d loss / d contribution."""
        self.model.train()
        for xb, gb in zip(batches, grads, strict=True):
            self.opt.zero_grad(set_to_none=True)
            out = self.model(torch.from_numpy(xb))
            out.backward(torch.from_numpy(gb))
            self.opt.step()
