"""Averaged DP-SGD iterates for the federated MLP (issue 20 acceptance: the MLP with default
settings at eps 1 >= 0.76 on UCI), in process.

De et al., "Unlocking High-Accuracy Differentially Private Image Classification through
Scale" (2022): an exponential moving average (or a tail average) of DP-SGD's parameters is
post-processing of the noisy iterates, free of privacy cost, and removes much of the noise the
last iterate carries. Vertically each party can average its own block (a silo its bottom
model, the authority its bias); the released model is the average of every block.

The protocol's training loop is bench/stale_gradients.py `simulate` (the real SiloTrainer,
BiasHead, DP-SGD from a secret stream, randomised response) with the noise server/privacy.py
`PrivacyPlan` calibrates at combined eps 1, as bench/mlp_defaults.py; delay compensation off
under DP as server/run_plan.py sets it. ONE training run per cell and seed is evaluated under
several averages at once (every Adam step updates them all): `last` (the last iterate, what a
run releases today), `emaD` (EMA with decay D per step, started at the initial weights) and
`tailF` (the uniform average of the last fraction F of the steps). Choose on VALIDATION AUC
(the final model's); test AUC is printed beside it, never used to choose.

A cell is `key=value,...` over: b (batch), e (epochs), lr, clip (the JOINT clip,
privacy.max_grad_norm: each of the K = silos + 1 blocks clips at clip / sqrt(K)), label
(label epsilon, inf = off), h (model.hidden, e.g. 32-16), c (chunk batches), loss (the
authority's loss on the randomised labels: forward = server/label_dp.py `corrected_gradient`,
what a run does; backward = the unbiased loss; plain = BCE on the noisy labels), sched
(every party's learning rate by step: const, cos, lin, or stepX = a tenth of it for the last
fraction X of the steps).

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/mlp_averaging.py --data uci --seeds 0 1 2 \
        --cell h=16
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlp_cells import cell_arguments, parse_cell, print_averages, print_means, seeded_data
from stale_gradients import Joined

from clients.protocol.model import BottomModel, ModelSpec
from clients.silo.trainer import SiloTrainer
from crypto.secret_random import SecretRandom
from server.config import PrivacyConfig, TrainConfig
from server.label_dp import flip_probability, randomized_response
from server.metrics import auc
from server.privacy import PrivacyPlan
from server.top import BiasHead
from server.training import batch_plan, chunk_schedule

DEFAULT_CELL = {"b": "2048", "e": "12", "lr": "0.01", "clip": "5", "label": "2", "h": "16",
                "c": "4", "loss": "forward", "sched": "const"}
DEFAULT_AVERAGES = ("last", "ema0.9", "ema0.95", "ema0.98", "tail0.5", "tail0.25")


class Averages:
    """Several averages of one party's parameters, updated after every optimiser step."""

    def __init__(self, params: list[nn.Parameter], names: tuple[str, ...], steps: int) -> None:
        self.params = params
        self.names = names
        self.steps = steps
        self.t = 0
        init = [p.detach().clone() for p in params]
        self.values = {n: [v.clone() for v in init] for n in names}
        self.counts = dict.fromkeys(names, 0)

    def update(self) -> None:
        self.t += 1
        now = [p.detach() for p in self.params]
        for name in self.names:
            avg = self.values[name]
            if name == "last":
                for a, w in zip(avg, now, strict=True):
                    a.copy_(w)
            elif name.startswith("ema"):
                d = float(name[3:])
                for a, w in zip(avg, now, strict=True):
                    a.mul_(d).add_(w, alpha=1 - d)
            elif name.startswith("tail"):
                start = self.steps - round(float(name[4:]) * self.steps)
                if self.t > start:
                    self.counts[name] += 1
                    k = self.counts[name]
                    for a, w in zip(avg, now, strict=True):
                        a.mul_((k - 1) / k).add_(w, alpha=1 / k)
                else:
                    for a, w in zip(avg, now, strict=True):
                        a.copy_(w)


def hook(opt: torch.optim.Optimizer, averages: Averages, sched: str = "const") -> None:
    """After every step: update the averages, and set the next step's learning rate."""
    inner = getattr(opt, "original_optimizer", opt)
    base = [g["lr"] for g in inner.param_groups]

    def after(*_: object) -> None:
        averages.update()
        f = schedule(sched, averages.t, averages.steps)
        for g, lr in zip(inner.param_groups, base, strict=True):
            g["lr"] = lr * f

    inner.register_step_post_hook(after)


def schedule(kind: str, t: int, steps: int) -> float:
    """The learning rate's factor for step t (0-based) of `steps`: constant, cosine or linear
    decay to zero (the last step's factor is 1/steps-ish, never exactly 0)."""
    frac = min(t, steps - 1) / steps
    if kind == "const":
        return 1.0
    if kind == "cos":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if kind == "lin":
        return 1.0 - frac
    if kind.startswith("step"):  # stepX: full lr, then lr/10 for the last fraction X
        return 0.1 if frac >= 1 - float(kind[4:]) else 1.0
    raise SystemExit(f"sched={kind!r}: const, cos, lin or stepX")


def run_cell(data: Joined, cell: dict[str, str], seed: int, secret: bytes,
             names: tuple[str, ...]) -> dict:
    silos_n = len(data.xs)
    blocks = silos_n + 1
    joint_clip = float(cell["clip"])
    clip = joint_clip / math.sqrt(blocks)
    cfg = TrainConfig(batch_size=int(cell["b"]), epochs=int(cell["e"]), lr=float(cell["lr"]),
                      chunk_batches=int(cell["c"]), delay_compensation=0.0)
    silo_names = tuple(f"silo{i}" for i in range(silos_n))
    label = float(cell["label"])
    plan = PrivacyPlan(PrivacyConfig(epsilon=1.0, max_grad_norm=joint_clip,
                                     label_epsilon=label), silo_names,
                       len(data.train), cfg.batch_size, cfg.epochs, ledger=None)
    sigma = plan.sigma
    hidden = tuple(int(h) for h in cell["h"].split("-") if h not in ("", "0"))  # h=0: linear
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    q = min(1.0, cfg.batch_size / len(data.train))
    spec = ModelSpec(hidden, cfg.lr, cfg.weight_decay, seed, noise_multiplier=sigma,
                     max_grad_norm=clip, sample_rate=q,
                     expected_batch=max(1, round(q * len(data.train))))
    random = SecretRandom(secret)
    silos = [SiloTrainer(x.shape[1], spec, salt, random=random, run_key=f"silo{salt}")
             for x, salt in zip(data.xs, data.salts, strict=True)]
    rho = flip_probability(label)
    y_view = (randomized_response(data.y, label, random.generator("labels", "bench"))
              if rho > 0 else data.y)
    head = BiasHead(float(data.y[data.train].mean()), spec, rho, random, "bench")
    if cell["loss"] != "forward":
        head._loss_grad = _label_loss(cell["loss"], rho)  # type: ignore[method-assign,assignment]
    plans = {e: batch_plan(data.train, cfg.batch_size, np.random.default_rng([seed, 0xBA7C, e]),
                           poisson=True)
             for e in range(cfg.epochs)}
    steps = sum(len(p) for p in plans.values())
    silo_avg = [Averages(list(s.base.parameters()), names, steps) for s in silos]
    head_avg = Averages(list(head.base.parameters()), names, steps)
    for s, a in zip(silos, silo_avg, strict=True):
        hook(s.opt, a, cell["sched"])
    hook(head.opt, head_avg, cell["sched"])
    evaluate = _evaluator(data, silos, silo_avg, head_avg, hidden)
    curves: dict[str, list[float]] = {n: [] for n in names}
    for epoch, first, end in chunk_schedule(len(plans[0]), cfg):
        if first == 0 and epoch > 0:
            for n in names:
                curves[n].append(evaluate(n, data.val))
        chunk = plans[epoch][first:end]
        rows = np.concatenate(chunk)
        sizes = [len(b) for b in chunk]
        summed = np.asarray(np.sum([s.contributions(x[rows])
                                    for s, x in zip(silos, data.xs, strict=True)],
                                   axis=0, dtype=np.float64))
        grads = head.gradients(summed, y_view[rows].astype(np.float64), sizes)
        cuts = np.cumsum(sizes)[:-1]
        for s, x in zip(silos, data.xs, strict=True):
            s.replay(np.split(x[rows], cuts), np.split(grads, cuts))
    for n in names:
        curves[n].append(evaluate(n, data.val))
    return {"steps": steps, "sigma": sigma, "joint_sigma": plan.joint_sigma,
            "val": {n: curves[n][-1] for n in names},
            "test": {n: evaluate(n, data.test) for n in names},
            "curve": curves, "seconds": time.perf_counter() - t0}


def _label_loss(kind: str, rho: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """d mean-loss / d z on randomised-response labels: `plain` BCE on the noisy labels,
    `backward` the unbiased loss of Natarajan et al. (NeurIPS 2013), whose gradient is
    sigmoid(z) - (y~ - rho) / (1 - 2 rho): in expectation over the flips, sigmoid(z) - y."""
    def grad(z: np.ndarray, y: np.ndarray) -> np.ndarray:
        s = 0.5 * (1 + np.tanh(0.5 * z))
        target = y if kind == "plain" else (y - rho) / (1 - 2 * rho)
        if kind not in ("plain", "backward"):
            raise SystemExit(f"loss={kind!r}: forward, backward or plain")
        return ((s - target) / max(len(z), 1)).astype(np.float32)
    return grad


def _evaluator(data: Joined, silos: list[SiloTrainer], silo_avg: list[Averages],
               head_avg: Averages, hidden: tuple[int, ...]) -> Callable[[str, np.ndarray], float]:
    models = [BottomModel(x.shape[1], hidden, 1) for x in data.xs]

    @torch.no_grad()
    def evaluate(name: str, rows: np.ndarray) -> float:
        z = np.full(len(rows), float(head_avg.values[name][0].reshape(-1)[0]))
        for model, avg, x in zip(models, silo_avg, data.xs, strict=True):
            for p, v in zip(model.parameters(), avg.values[name], strict=True):
                p.copy_(v)
            model.eval()
            z += model(torch.from_numpy(x[rows])).numpy().reshape(-1).astype(np.float64)
        return auc(data.y[rows], 1 / (1 + np.exp(-z)))

    return evaluate


def main() -> None:
    ap = cell_arguments(__doc__)
    ap.add_argument("--averages", nargs="+", default=list(DEFAULT_AVERAGES))
    args = ap.parse_args()
    names = tuple(args.averages)
    cells = [parse_cell(c, DEFAULT_CELL) for c in args.cell]
    results: dict[int, list[dict]] = {i: [] for i in range(len(cells))}
    for seed, secret, data in seeded_data(args, "mlpavg-"):
        for i, cell in enumerate(cells):
            r = run_cell(data, cell, seed, secret, names)
            results[i].append(r)
            print(f"  {args.cell[i]} steps {r['steps']} sigma_j {r['joint_sigma']:.2f} "
                  f"sigma {r['sigma']:.2f} {r['seconds']:.1f} s", flush=True)
            print_averages(r, names)
    print_means(args.cell, results, names, args.seeds)


if __name__ == "__main__":
    main()
