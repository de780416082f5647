"""A silo's bottom model and its local optimiser, optionally with DP-SGD (Opacus).

The bottom model g_k maps a silo's features to one logit contribution. No BatchNorm: DP-SGD needs
per-sample gradients, and BatchNorm mixes samples. The last layer starts at zero so every silo
begins by contributing nothing and the authority's bias starts at the prior.

With DP, the model is wrapped in Opacus's GradSampleModule and the optimiser in its DPOptimizer:
backpropagating the authority's d loss / d contribution gives per-sample gradients, which are
clipped to `max_grad_norm` and noised before each step. The party's accountant history covers
the whole run and travels with its state.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from clients.accounting import History, add_steps
from crypto.secret_random import SecretRandom

# Opacus's hooks fire on module outputs because the inputs need no gradient: expected here.
# A module-level filter, not catch_warnings(): that context manager is not thread-safe, and the
# authority runs DP steps while its ledger thread computes epsilons.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


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
        )


def hidden_layers(inputs: int, hidden: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """Linear + ReLU per hidden width; returns the layers and the last width."""
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
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


def build(n_inputs: int, spec: ModelSpec, salt: int = 0) -> tuple[BottomModel, torch.optim.Adam]:
    """A freshly initialised model and optimiser; `salt` separates parties sharing a seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed * 1_000_003 + salt)
        model = BottomModel(n_inputs, spec.hidden, spec.outputs)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return model, opt


class SecretNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer whose Gaussian noise comes from the party's secret stream.

    Opacus draws from a torch.Generator (Mersenne Twister), whose state follows from its seed;
    here every step's noise is drawn from a ChaCha20 stream keyed by a secret only this party
    holds (crypto/secret_random.py). The caller hands in the step's stream (`noise_rng`)
    before each `step()`; a step without one fails rather than add predictable noise. Each
    coordinate is the sum of four standard normals halved, as Opacus's secure mode does against
    floating-point attacks on the Gaussian's low bits (Holohan et al. 2021)."""

    noise_rng: np.random.Generator | None = None

    def add_noise(self) -> None:
        rng, self.noise_rng = self.noise_rng, None
        if rng is None:
            raise RuntimeError("a DP-SGD step without its secret noise stream (set noise_rng)")
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = secret_gaussian(rng, tuple(p.summed_grad.shape), std)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)


def secret_gaussian(rng: np.random.Generator, shape: tuple[int, ...], std: float
                    ) -> torch.Tensor:
    """N(0, std^2) per coordinate from `rng`: (n1 + n2 + n3 + n4) / 2, in float64."""
    if std == 0:
        return torch.zeros(shape, dtype=torch.float64)
    draws = rng.standard_normal((4, *shape)).sum(axis=0) * (0.5 * std)
    return torch.from_numpy(draws)


def make_private(
    model: nn.Module, opt: torch.optim.Optimizer, *, noise_multiplier: float,
    max_grad_norm: float, expected_batch: int,
) -> tuple[GradSampleModule, SecretNoiseDPOptimizer]:
    """Opacus's per-sample gradients and clipping around a model/optimiser, with secret noise
    (set `noise_rng` on the optimiser before every step)."""
    private = GradSampleModule(model, loss_reduction="mean")
    dp_opt = SecretNoiseDPOptimizer(
        opt,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
    )
    # Opacus sets the `flwr` logger (and others) to DEBUG when imported; keep them quiet.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    return private, dp_opt


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer, **extra: object) -> bytes:
    """A party's model and optimiser (plus `extra`) as bytes, pickle-free on load
    (weights_only). No random state: every draw is addressed by (purpose, run, step)."""
    inner = getattr(opt, "original_optimizer", opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": inner.state_dict(), **extra}, buf)
    return buf.getvalue()


def load_state_bytes(blob: bytes, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore what `state_bytes` saved; returns the whole state for the extras."""
    state = torch.load(io.BytesIO(blob), weights_only=True)
    model.load_state_dict(state["model"])
    getattr(opt, "original_optimizer", opt).load_state_dict(state["opt"])
    return state


class SiloTrainer:
    """A silo's model, optimiser and accountant history, serialisable into the node's Flower
    state between messages. `random` is the silo's secret stream source: DP noise and
    transcript noise come from it, never from the run seed (which only initialises)."""

    def __init__(self, n_inputs: int, spec: ModelSpec, salt: int = 0, *,
                 random: SecretRandom | None = None, run_key: str = "") -> None:
        if spec.dp and random is None:
            raise ValueError("DP-SGD needs the silo's secret randomness")
        self.n_inputs = n_inputs
        self.spec = spec
        self.random = random
        self.run_key = run_key
        self.base, opt = build(n_inputs, spec, salt)
        self.history: History = []
        # Opacus's wrappers under DP-SGD, the plain model and Adam otherwise.
        self.model: nn.Module
        self.opt: torch.optim.Optimizer
        if spec.dp:
            self.model, self.opt = make_private(
                self.base, opt, noise_multiplier=spec.noise_multiplier,
                max_grad_norm=spec.max_grad_norm, expected_batch=spec.expected_batch)
        else:
            self.model, self.opt = self.base, opt

    @property
    def steps_taken(self) -> int:
        return sum(h[2] for h in self.history)

    def to_bytes(self) -> bytes:
        return state_bytes(self.base, self.opt, history=[list(h) for h in self.history])

    def load_bytes(self, blob: bytes) -> None:
        state = load_state_bytes(blob, self.base, self.opt)
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    @torch.no_grad()
    def contributions(self, x: np.ndarray) -> np.ndarray:
        self.base.eval()
        return self.base(torch.from_numpy(x)).numpy().astype(np.float32)

    def released(self, x: np.ndarray, *purpose: object) -> np.ndarray:
        """Contributions as they leave the silo: clipped and noised under transcript DP.

        The noise comes from the silo's secret stream for `purpose` (round, key and the digest
        of the positions asked for): the authority cannot predict and subtract it, and the same
        request answered again gets the same noise, not a second independent release."""
        values = self.contributions(x)
        if self.spec.transcript_sigma <= 0:
            return values
        if self.random is None:
            raise ValueError("transcript noise needs the silo's secret randomness")
        clip = self.spec.transcript_clip
        noise = self.random.generator("transcript", self.run_key, *purpose).normal(
            0.0, self.spec.transcript_sigma * 2 * clip, size=len(values))
        return (np.clip(values, -clip, clip) + noise).astype(np.float32)

    def replay(self, batches: list[np.ndarray], grads: list[np.ndarray]) -> None:
        """One optimiser step per batch, backpropagating the authority's d loss / d contribution.

        With DP every batch is one DP-SGD step on the accountant, empty batches included (a
        Poisson sample can be empty; the noise is still added and the step still counts). Step
        t's noise is the stream ("dp-noise", run, t) of the silo's secret.
        """
        self.model.train()
        for xb, gb in zip(batches, grads, strict=True):
            self.opt.zero_grad(set_to_none=True)
            if len(xb):
                out = self.model(torch.from_numpy(xb))
                out.backward(torch.from_numpy(gb))
            elif self.spec.dp:
                for p in self.base.parameters():
                    # Opacus's per-sample field, which torch's stubs do not declare
                    p.grad_sample = torch.zeros((0, *p.shape))  # type: ignore[attr-defined]
            if self.spec.dp:
                assert self.random is not None
                assert isinstance(self.opt, SecretNoiseDPOptimizer)
                self.opt.noise_rng = self.random.generator("dp-noise", self.run_key,
                                                           self.steps_taken)
            if len(xb) or self.spec.dp:
                self.opt.step()
            if self.spec.dp:
                self.history = add_steps(
                    self.history, self.spec.noise_multiplier, self.spec.sample_rate, 1
                )
