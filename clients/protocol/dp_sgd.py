"""DP-SGD wiring shared by every party that trains: Opacus with the party's secret noise.

The model is wrapped in Opacus's GradSampleModule and the optimiser in its DPOptimizer:
backpropagating d loss / d output gives per-sample gradients, which are clipped to
`max_grad_norm` and noised before each step, the noise drawn from the party's secret stream.
A silo's bottom model, a region's model and the authority's head all train through it; a
party's state (model, optimiser and whatever else it keeps) travels as `state_bytes`.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

# Opacus's hooks fire on module outputs because the inputs need no gradient: expected here.
# A module-level filter, not catch_warnings(): that context manager is not thread-safe, and the
# authority runs DP steps while its ledger thread computes epsilons.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


class SecretNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer whose Gaussian noise comes from the party's secret stream.

    Opacus draws from a torch.Generator (Mersenne Twister), whose state follows from its seed;
    here every step's noise is drawn from a ChaCha20 stream keyed by a secret only this party
    holds (crypto/secret_random.py). The caller hands in the step's stream (`noise_rng`, set by
    `noised_step` or `arm_noise`) before each `step()`; a step without one fails rather than
    add predictable noise. Each coordinate is the sum of four standard normals halved, as
    Opacus's secure mode does against floating-point attacks on the Gaussian's low bits
    (Holohan et al. 2021)."""

    noise_rng: np.random.Generator | None = None

    def add_noise(self) -> None:
        rng, self.noise_rng = self.noise_rng, None
        if rng is None:
            raise RuntimeError("a DP-SGD step without its secret noise stream (noised_step)")
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


def mark_empty_batch(model: nn.Module) -> None:
    """Make an empty Poisson batch a DP-SGD step: every parameter gets zero per-sample
    gradients, so the optimiser clips and sums nothing and still adds the step's noise. The
    accountant counts every sampled step, empty or not; skipping one would release less noise
    than it accounts for, and would show that the batch was empty."""
    for p in model.parameters():
        # Opacus's per-sample field, which torch's stubs do not declare
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]


def arm_noise(opt: torch.optim.Optimizer, *, noise: np.random.Generator
              ) -> SecretNoiseDPOptimizer:
    """`opt`, `make_private`'s optimiser, with `noise` as its next step's secret stream.

    A plain optimiser is refused: a step the caller means to be private would otherwise go
    out unclipped and unnoised."""
    if not isinstance(opt, SecretNoiseDPOptimizer):
        raise TypeError(f"a DP-SGD step needs make_private's optimiser, not {type(opt).__name__}")
    opt.noise_rng = noise
    return opt


def noised_step(opt: torch.optim.Optimizer, *, noise: np.random.Generator) -> None:
    """One DP-SGD step of `make_private`'s optimiser: clip, sum, add noise drawn from `noise`
    (the party's secret stream for this step), then the inner optimiser's step."""
    arm_noise(opt, noise=noise).step()


def remove_private_hooks(module: nn.Module) -> None:
    """Detach Opacus's per-sample hooks when `module` is `make_private`'s wrapper (a plain
    module is left alone), so the model trains or evaluates without them afterwards."""
    if isinstance(module, GradSampleModule):
        module.remove_hooks()


def make_private(
    model: nn.Module, opt: torch.optim.Optimizer, *, noise_multiplier: float,
    max_grad_norm: float, expected_batch: int,
) -> tuple[GradSampleModule, SecretNoiseDPOptimizer]:
    """Opacus's per-sample gradients and clipping around a model/optimiser, with secret noise
    (step with `noised_step`, or `arm_noise` before a step taken in parts)."""
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
