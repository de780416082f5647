"""The model both sides agree on: a party's bottom model and the spec the authority sends.

The bottom model g_k maps a party's features to one logit contribution (or an embedding in
`concat` mode). No BatchNorm: DP-SGD needs per-sample gradients, and BatchNorm mixes samples.
A single contribution's last layer starts at zero, so every silo begins by contributing nothing
and the authority's bias starts at the prior. The authority builds its head from the same
`hidden_layers`; under the horizontal topology every region trains a BottomModel and the server
builds the global one (clients/protocol/region.py `global_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    hidden: tuple[int, ...] = (32, 16)
    lr: float = 0.003
    weight_decay: float = 0.0
    seed: int = 0
    # DP-SGD: noise_multiplier 0 means no DP. expected_batch is q * N for Poisson plans.
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    sample_rate: float = 0.0
    expected_batch: int = 0
    # eps_transcript: contributions clipped to [-transcript_clip, transcript_clip] and sent with
    # Gaussian noise of std transcript_sigma * 2 * transcript_clip (replace-one sensitivity).
    transcript_sigma: float = 0.0
    transcript_clip: float = 4.0
    # Values per person a silo sends: 1 in `sum` mode, the embedding width in `concat` mode.
    outputs: int = 1
    # Delay compensation of stale gradients (clients/silo/trainer.py `replay`): 0 replays the
    # authority's gradients as sent; lambda > 0 corrects each row's for the silo's own drift
    # since its contribution was sent, scaled by lambda (train.delay_compensation x silos, set
    # by the authority in `sum` mode without DP-SGD).
    staleness_correction: float = 0.0

    @property
    def dp(self) -> bool:
        return self.noise_multiplier > 0

    def to_config(self) -> dict:
        return {
            "hidden": list(self.hidden),
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch": self.expected_batch,
            "transcript_sigma": self.transcript_sigma,
            "transcript_clip": self.transcript_clip,
            "outputs": self.outputs,
            "staleness_correction": self.staleness_correction,
        }

    @classmethod
    def from_config(cls, cfg: dict) -> ModelSpec:
        return cls(
            hidden=tuple(int(h) for h in cfg["hidden"]),
            lr=float(cfg["lr"]),
            weight_decay=float(cfg["weight_decay"]),
            seed=int(cfg["seed"]),
            noise_multiplier=float(cfg.get("noise_multiplier", 0.0)),
            max_grad_norm=float(cfg.get("max_grad_norm", 1.0)),
            sample_rate=float(cfg.get("sample_rate", 0.0)),
            expected_batch=int(cfg.get("expected_batch", 0)),
            transcript_sigma=float(cfg.get("transcript_sigma", 0.0)),
            transcript_clip=float(cfg.get("transcript_clip", 4.0)),
            outputs=int(cfg.get("outputs", 1)),
            staleness_correction=float(cfg.get("staleness_correction", 0.0)),
        )


def hidden_layers(inputs: int, hidden: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """Linear + ReLU per hidden width; returns the layers and the last width. A width of 0
    adds no layer: `hidden` = (0,) (`model.hidden=0`) leaves the model one linear map."""
    layers: list[nn.Module] = []
    width = inputs
    for h in filter(None, hidden):
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return layers, width


class BottomModel(nn.Module):
    """One logit contribution per person (`outputs` = 1), or an embedding of `outputs` values.

    A single contribution starts at zero so the sum starts at the authority's prior; an
    embedding keeps its random start, or the head above it would see only zeros."""

    def __init__(self, n_inputs: int, hidden: tuple[int, ...], outputs: int = 1) -> None:
        super().__init__()
        layers, width = hidden_layers(n_inputs, hidden)
        out = nn.Linear(width, outputs)
        if outputs == 1:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
        layers.append(out)
        self.net = nn.Sequential(*layers)
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.outputs == 1 else out
