"""A region's local training round (horizontal topology), optionally with DP-SGD (Opacus).

Each round starts from the global model and takes `local_epochs / q` steps on Poisson samples
of the region's training customers (sample rate q = batch / n). With sample-level DP the steps
are Opacus DP-SGD steps and go on the region's ONE accountant history for the whole run. With
FedProx the proximal gradient mu (w - w_global) is added after Opacus has clipped and noised the
data gradient: it depends on no customer, so it costs no privacy and is never clipped.

Every draw the guarantee rests on, the Poisson samples and the DP-SGD noise, comes from the
region's own secret streams (crypto/secret_random.py), never from the public run seed, which
only initialises the global model and chooses the split. A round's streams are addressed by the
caller's `stream` (the region binds it to the plan, the global model it received and its own
training data), so keeping the keystores reproduces a run and a round asked again with the same
model gets the same answer, not a second, independent release.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from clients.protocol.accounting import History, add_steps, affordable_steps, calibrate_sigma
from clients.protocol.dp_constants import default_delta
from clients.protocol.dp_sgd import (
    arm_noise,
    make_private,
    mark_empty_batch,
    remove_private_hooks,
)
from clients.protocol.model import BottomModel
from clients.protocol.region import LocalSpec
from crypto.secret_random import SecretRandom, digest


@dataclass(frozen=True)
class Plan:
    """A region's DP-SGD plan for the whole run, fixed at its first round."""

    sample_rate: float
    steps_per_round: int
    noise_multiplier: float  # 0 without DP
    delta: float

    @classmethod
    def make(cls, n_train: int, spec: LocalSpec) -> Plan:
        q = min(1.0, spec.batch_size / n_train)
        steps = max(1, round(spec.local_epochs / q))
        delta = default_delta(spec.delta, n_train)
        sigma = (calibrate_sigma(spec.epsilon, delta, q, steps * spec.rounds, spec.accountant)
                 if spec.dp else 0.0)
        return cls(q, steps, sigma, delta)


def round_stream(plan: dict, model: torch.nn.Module, x: np.ndarray, y: np.ndarray
                 ) -> tuple[str, ...]:
    """What a round's secret streams are bound to: the plan as the server sent it (run seed,
    budget, round), the global model the round starts from, and the training data. The same
    request on the same data draws the same samples and noise again; anything different draws
    independent ones. The digests stay inside the party (HKDF info), they are never sent."""
    text = json.dumps({k: plan[k] for k in sorted(plan)}, sort_keys=True, default=str)
    weights = hashlib.sha256()
    for value in model.state_dict().values():
        weights.update(value.detach().cpu().numpy().tobytes())
    return ("horizontal", hashlib.sha256(text.encode()).hexdigest()[:32],
            weights.hexdigest()[:32], digest(x), digest(y))


@dataclass
class RoundResult:
    history: History
    steps: int
    loss: float
    stopped: bool  # the budget cap allowed fewer steps than planned


def train_round(model: BottomModel, x: np.ndarray, y: np.ndarray, spec: LocalSpec, plan: Plan,
                history: History, random: SecretRandom, stream: tuple) -> RoundResult:
    """One round of local training on (x, y), in place on `model`.

    The Poisson samples come from `random`'s stream ("poisson", *stream) and step t's DP-SGD
    noise from ("dp-noise", *stream, t): the party's secret, never the run seed."""
    steps = plan.steps_per_round
    stopped = False
    if spec.dp:
        cap = spec.cap or spec.epsilon
        steps = affordable_steps(spec.accountant, history, plan.noise_multiplier,
                                 plan.sample_rate, steps, plan.delta, cap)
        stopped = steps < plan.steps_per_round
    sampler = random.generator("poisson", *stream)
    anchor = [p.detach().clone() for p in model.parameters()]
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    module: torch.nn.Module = model
    if spec.dp:
        module, opt = make_private(model, opt, noise_multiplier=plan.noise_multiplier,
                                   max_grad_norm=spec.max_grad_norm,
                                   expected_batch=max(1, round(plan.sample_rate * len(y))))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    losses = []
    module.train()
    for step in range(steps):
        idx = torch.from_numpy(np.flatnonzero(sampler.random(len(y)) < plan.sample_rate))
        opt.zero_grad(set_to_none=True)
        if len(idx):
            loss = loss_fn(module(xt[idx]), yt[idx])
            loss.backward()
            losses.append(float(loss.detach()))
        elif spec.dp:  # an empty Poisson sample is still a noised step on the accountant
            mark_empty_batch(model)
        else:
            continue
        noise = random.generator("dp-noise", *stream, step) if spec.dp else None
        _step(opt, model, anchor, spec.proximal_mu, noise)
    if spec.dp and steps:
        history = add_steps(history, plan.noise_multiplier, plan.sample_rate, steps)
    remove_private_hooks(module)
    return RoundResult(history, steps, float(np.mean(losses)) if losses else float("nan"),
                       stopped)


def _step(opt: torch.optim.Optimizer, model: torch.nn.Module, anchor: list[torch.Tensor],
          mu: float, noise: np.random.Generator | None) -> None:
    """One step; with `noise` (DP-SGD) Opacus clips and noises the data gradient first, and
    the proximal term is added after, outside the clipping."""
    inner = opt
    if noise is not None:
        dp_opt = arm_noise(opt, noise=noise)
        if not dp_opt.pre_step():  # clipped, accumulated, noised into p.grad
            return
        inner = dp_opt.original_optimizer
    if mu > 0:
        with torch.no_grad():
            for p, a in zip(model.parameters(), anchor, strict=True):
                if p.grad is None:  # cannot happen: the step above filled every gradient
                    raise RuntimeError("FedProx: a parameter has no gradient to add mu to")
                p.grad.add_(p.detach() - a, alpha=mu)
    inner.step()


@torch.no_grad()
def predict_logits(model: BottomModel, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy().astype(np.float64)
