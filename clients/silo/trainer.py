"""A silo's local optimiser for its bottom model, optionally with DP-SGD (Opacus).

The bottom model and its spec are the protocol's (clients/protocol/model.py), and so is the
DP-SGD wiring (clients/protocol/dp_sgd.py). With DP, backpropagating the authority's
d loss / d contribution gives per-sample gradients, which are clipped to `max_grad_norm` and
noised before each step. The silo's accountant history covers the whole run and travels with
its state.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clients.protocol.accounting import History, add_steps
from clients.protocol.dp_sgd import (
    load_state_bytes,
    make_private,
    mark_empty_batch,
    noised_step,
    state_bytes,
)
from clients.protocol.model import BottomModel, ModelSpec
from crypto.secret_random import SecretRandom


def compensated(grad: np.ndarray, drift: np.ndarray, lam: float) -> np.ndarray:
    """The authority's d loss / d contribution for a batch, corrected for this silo's drift
    since it sent the contributions (delay compensation, Zheng et al., "Asynchronous Stochastic
    Gradient Descent with Delay Compensation", ICML 2017, in output space).

    A batch's gradient was computed at the stale logit z; at the current one it would be
    about grad + h * dz, with h = sigmoid'(z) / B the curvature of the mean log-loss. As in
    DC-ASGD, h is estimated from the gradient itself: B * grad^2 = (sigmoid(z) - y)^2 / B,
    whose expectation over the label is exactly sigmoid'(z) / B (the Fisher information).
    The silo sees only its own drift dz_k; the other silos move too, descending the same
    residuals, so `lam` scales it (about the number of silos when they move alike). Each row's
    correction reads only that row's gradient and the silo's own data: post-processing of what
    the silo received, per person, so DP-SGD's per-sample clipping and every budget hold as
    before, and nothing new is sent.
    """
    batch = len(grad)
    return (grad + lam * batch * grad * grad * drift).astype(np.float32)


def build(n_inputs: int, spec: ModelSpec, salt: int = 0) -> tuple[BottomModel, torch.optim.Adam]:
    """A freshly initialised model and optimiser; `salt` separates parties sharing a seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed * 1_000_003 + salt)
        model = BottomModel(n_inputs, spec.hidden, spec.outputs)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return model, opt


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
        # The bottom model's weights at the epoch the authority named the best on validation
        # so far (non-private runs only, `keep`); the final read restores them (`restore`).
        self.kept: dict[str, torch.Tensor] | None = None
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
        # The kept weights travel with the model, so every round's checkpoint (and a resumed
        # run) holds the same best-epoch state as an uninterrupted run.
        extra = {} if self.kept is None else {"kept": self.kept}
        return state_bytes(self.base, self.opt, history=[list(h) for h in self.history],
                           **extra)

    def load_bytes(self, blob: bytes) -> None:
        state = load_state_bytes(blob, self.base, self.opt)
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.kept = state.get("kept")

    def keep(self) -> None:
        """Keep a copy of the current weights: the ones the last evaluation was computed at."""
        self.kept = {k: v.detach().clone() for k, v in self.base.state_dict().items()}

    def restore(self) -> None:
        """Go back to the kept weights (the optimiser's state no longer matters: the final
        read comes after the last step)."""
        if self.kept is None:
            raise ValueError("no weights were kept in this run")
        self.base.load_state_dict(self.kept)

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
        # The contributions this silo sent for the chunk, at the weights it sent them with: the
        # replay starts from those weights (the silo computes a chunk's contributions right
        # after replaying the previous chunk, and nothing moves its weights in between).
        lam = self.spec.staleness_correction
        sent = [self.contributions(xb) for xb in batches] if lam > 0 else []
        self.model.train()
        for j, (xb, gb) in enumerate(zip(batches, grads, strict=True)):
            self.opt.zero_grad(set_to_none=True)
            if len(xb):
                out = self.model(torch.from_numpy(xb))
                if lam > 0:
                    gb = compensated(gb, out.detach().numpy() - sent[j], lam)
                out.backward(torch.from_numpy(gb))
            elif self.spec.dp:
                mark_empty_batch(self.base)
            if self.spec.dp:
                assert self.random is not None  # __init__ refuses DP without it
                noised_step(self.opt, noise=self.random.generator("dp-noise", self.run_key,
                                                                  self.steps_taken))
                self.history = add_steps(
                    self.history, self.spec.noise_multiplier, self.spec.sample_rate, 1
                )
            elif len(xb):
                self.opt.step()
