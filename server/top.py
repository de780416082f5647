"""The authority's part of the model, on top of what the silos send.

`sum` mode (the default, a scorecard): z = b + sum_k g_k. The authority learns only the bias b
and, under secure aggregation, sees only the sum.

`concat` mode (split learning): each silo sends a d-dimensional embedding e_k and the authority
runs a small MLP on [e_1, ..., e_K]. More expressive, but the authority sees every silo's
embedding of every person it asks about, so secure aggregation cannot apply; it is offered for
comparison and documented as the weaker mode (docs/threat-model.md).

Both heads train with Adam, and with DP-SGD (Opacus, one step per batch) when the run is
private: the head is trained on person-level data (the authority's labels and the silos'
outputs) and is released with the model, so it needs its own eps_model like any silo.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clients.protocol.dp_sgd import (
    load_state_bytes,
    make_private,
    mark_empty_batch,
    noised_step,
    state_bytes,
)
from clients.protocol.model import ModelSpec, hidden_layers
from crypto.secret_random import SecretRandom
from server.label_dp import corrected_gradient

# Separates the head's initialisation from the silos' (their salts are 1..K).
HEAD_SALT = 0x70B


def prior_logit(prior: float) -> float:
    return float(np.log(prior / (1 - prior)))


class ConcatHead(nn.Module):
    """MLP over the silos' concatenated embeddings; the output bias starts at the prior."""

    def __init__(self, inputs: int, hidden: tuple[int, ...], prior: float) -> None:
        super().__init__()
        layers, width = hidden_layers(inputs, hidden)
        out = nn.Linear(width, 1)
        with torch.no_grad():
            out.weight.mul_(0.1)  # small, so early logits stay near the prior
            out.bias.fill_(prior_logit(prior))
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.net(e).squeeze(-1)


def build_head(silos: int, spec: ModelSpec, top_hidden: tuple[int, ...], prior: float
               ) -> ConcatHead:
    """The concat head with the run's seeded initialisation (the central baseline reuses it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed * 1_000_003 + HEAD_SALT)
        return ConcatHead(silos * spec.outputs, top_hidden, prior)


class _Head:
    """Shared optimiser, DP wrapping and checkpointing of either head."""

    def __init__(self, module: nn.Module, spec: ModelSpec, rho: float, random: SecretRandom,
                 run_key: str) -> None:
        self.rho = rho
        self.base = module
        self.dp = spec.dp
        self.random, self.run_key = random, run_key
        self.steps = 0  # DP-SGD steps taken: step t's noise is the stream (run, t)
        opt = torch.optim.Adam(module.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        # Opacus's wrappers under DP-SGD, the plain module and Adam otherwise.
        self.module: nn.Module
        self.opt: torch.optim.Optimizer
        if spec.dp:
            self.module, self.opt = make_private(
                module, opt, noise_multiplier=spec.noise_multiplier,
                max_grad_norm=spec.max_grad_norm, expected_batch=spec.expected_batch)
        else:
            self.module, self.opt = module, opt

    def to_bytes(self) -> bytes:
        return state_bytes(self.base, self.opt, steps=self.steps)

    def load_bytes(self, blob: bytes) -> None:
        self.steps = int(load_state_bytes(blob, self.base, self.opt).get("steps", 0))

    def _step(self) -> None:
        """One optimiser step; under DP its noise comes from the authority's secret stream."""
        if not self.dp:
            self.opt.step()
            return
        noised_step(self.opt, noise=self.random.generator("head-noise", self.run_key,
                                                          self.steps))
        self.steps += 1

    def _empty_step(self) -> None:
        """A Poisson batch can be empty: under DP the noisy step still happens and counts."""
        if self.dp:
            # Cleared first, like a batch's step: the previous step's summed gradient would
            # otherwise be summed into this one (Opacus refuses it as not cleared).
            self.opt.zero_grad(set_to_none=True)
            mark_empty_batch(self.base)
            self._step()

    def _loss_grad(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """d mean-loss / d z under the (possibly randomised) labels."""
        return (corrected_gradient(z, y, self.rho) / max(len(z), 1)).astype(np.float32)


class BiasHead(_Head):
    base: nn.Linear  # the one-weight layer __init__ passes up
    """`sum` mode: z = b + sum_k g_k; `inputs` is the decoded sum, one value per row."""

    def __init__(self, prior: float, spec: ModelSpec, rho: float, random: SecretRandom,
                 run_key: str) -> None:
        linear = nn.Linear(1, 1, bias=False)  # b = weight * 1, so Opacus can wrap it
        with torch.no_grad():
            linear.weight.fill_(prior_logit(prior))
        super().__init__(linear, spec, rho, random, run_key)

    @property
    def bias(self) -> float:
        return float(self.base.weight.detach()[0, 0])

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        return self.bias + inputs

    def gradients(self, inputs: np.ndarray, y: np.ndarray, sizes: list[int]) -> np.ndarray:
        """d mean-loss / d g_k for each row of each batch (the same for every silo), stepping
        b after every batch."""
        grads = np.empty(len(inputs), dtype=np.float32)
        start = 0
        for size in sizes:
            stop = start + size
            g = self._loss_grad(self.bias + inputs[start:stop], y[start:stop])
            grads[start:stop] = g
            if size:
                self.opt.zero_grad(set_to_none=True)
                self.module(torch.ones(size, 1)).squeeze(-1).backward(torch.from_numpy(g))
                self._step()
            else:
                self._empty_step()
            start = stop
        return grads


class MlpHead(_Head):
    """`concat` mode: z = MLP([e_1, ..., e_K]); `inputs` holds the embeddings side by side."""

    def __init__(self, prior: float, spec: ModelSpec, rho: float, silos: int,
                 top_hidden: tuple[int, ...], random: SecretRandom, run_key: str) -> None:
        super().__init__(build_head(silos, spec, top_hidden, prior), spec, rho, random, run_key)

    @property
    def bias(self) -> float:
        return float("nan")  # no single bias: the head is an MLP

    @torch.no_grad()
    def logits(self, inputs: np.ndarray) -> np.ndarray:
        self.base.eval()
        return self.base(torch.from_numpy(inputs.astype(np.float32))).numpy().astype(np.float64)

    def gradients(self, inputs: np.ndarray, y: np.ndarray, sizes: list[int]) -> np.ndarray:
        """d mean-loss / d e for each row (each silo gets its own columns), stepping the head
        after every batch; the gradient is taken at the weights before that batch's step."""
        self.base.train()
        grads = np.empty(inputs.shape, dtype=np.float32)
        start = 0
        for size in sizes:
            stop = start + size
            if size:
                e = torch.from_numpy(inputs[start:stop].astype(np.float32)).requires_grad_()
                self.opt.zero_grad(set_to_none=True)
                z = self.module(e)
                g = self._loss_grad(z.detach().numpy().astype(np.float64), y[start:stop])
                z.backward(torch.from_numpy(g))
                if e.grad is None:  # cannot happen: e requires grad and z depends on it
                    raise RuntimeError("the head's backward pass left no input gradient")
                grads[start:stop] = e.grad.numpy()
                self._step()
            else:
                self._empty_step()
            start = stop
        return grads
