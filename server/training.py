"""Vertical federated training in `sum` mode: z = b + sum_k g_k(x_k).

One Flower round trip per chunk of batches, never per mini-batch (each trip costs ~100 ms).
A `train.step` message carries the gradient for the previous chunk and the plan of the next:

    authority                                   silo k
    plan_c (positions of K batches)  ------->   g_k(x[plan_c])  at current weights
              <-------  contributions
    z = b + sum_k g_k ; dL/dz per row
    grad_c + plan_{c+1}              ------->   replay plan_c with grad_c (K optimiser steps),
                                                then contributions for plan_{c+1}

This is block-coordinate descent with staleness bounded by the chunk size: a batch's gradient
was computed from contributions made before the chunk's earlier batches were applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from clients import messages as m
from server.config import TrainConfig
from server.federation import Federation, FederationError
from server.metrics import auc, log_loss

log = logging.getLogger(__name__)

Progress = Callable[..., None]


@dataclass
class TrainResult:
    bias: float
    logits: np.ndarray  # z for every position, after training
    history: list[dict] = field(default_factory=list)
    round_trips: int = 0
    silo_seconds: dict[str, float] = field(default_factory=dict)


def batch_plan(train: np.ndarray, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    """Shuffled mini-batches of the training positions for one epoch."""
    order = np.random.default_rng([seed, 0xBA7C, epoch]).permutation(train)
    return np.array_split(order, max(1, int(np.ceil(len(order) / batch_size))))


def chunk_sizes(cfg: TrainConfig) -> Iterator[int]:
    """Batches per round trip: doubling from 1 to chunk_batches with warm-up, else constant."""
    size = 1 if cfg.chunk_warmup else cfg.chunk_batches
    while True:
        yield size
        size = min(2 * size, cfg.chunk_batches)


def chunks(batches: list[np.ndarray], sizes: Iterator[int]) -> Iterator[list[np.ndarray]]:
    start = 0
    while start < len(batches):
        size = next(sizes)
        yield batches[start : start + size]
        start += size


def count_trips(n_batches: int, epochs: int, cfg: TrainConfig) -> int:
    sizes = chunk_sizes(cfg)
    return sum(len(list(chunks([np.empty(0)] * n_batches, sizes))) for _ in range(epochs))


class Top:
    """The authority's part of the model: the bias b (trained with Adam like the silos)."""

    def __init__(self, prior: float, lr: float) -> None:
        logit = np.log(prior / (1 - prior))
        self.bias = torch.nn.Parameter(torch.tensor([logit], dtype=torch.float32))
        self.opt = torch.optim.Adam([self.bias], lr=lr)

    @property
    def value(self) -> float:
        return float(self.bias.detach()[0])

    def gradients(self, partial: np.ndarray, y: np.ndarray, sizes: list[int]) -> np.ndarray:
        """d mean-BCE / d z for each row of each batch, stepping b after every batch."""
        grads = np.empty(len(partial), dtype=np.float32)
        start = 0
        for size in sizes:
            stop = start + size
            z = self.value + partial[start:stop]
            g = (1.0 / (1.0 + np.exp(-z)) - y[start:stop]) / size
            grads[start:stop] = g
            self.opt.zero_grad()
            self.bias.grad = torch.tensor([g.sum()], dtype=torch.float32)
            self.opt.step()
            start = stop
        return grads


def _summed(replies: dict[str, object], key: str, expected: int) -> np.ndarray:
    total = np.zeros(expected, dtype=np.float64)
    for silo, reply in replies.items():
        part = m.get_array(reply, key, np.float32, 1)
        if len(part) != expected:
            raise FederationError(
                f"silo {silo!r} sent {len(part)} contributions for {expected} rows; "
                "its model or alignment is out of step"
            )
        total += part
    return total


def train(
    fed: Federation,
    y: np.ndarray,
    train_pos: np.ndarray,
    val_pos: np.ndarray,
    n_positions: int,
    cfg: TrainConfig,
    seed: int,
    progress: Progress | None = None,
) -> TrainResult:
    top = Top(prior=float(y[train_pos].mean()), lr=cfg.lr)
    n_batches = int(np.ceil(len(train_pos) / cfg.batch_size))
    total_chunks = count_trips(n_batches, cfg.epochs, cfg)
    sizes_of_chunks = chunk_sizes(cfg)
    result = TrainResult(bias=top.value, logits=np.empty(0))
    silo_seconds = dict.fromkeys(fed.silos, 0.0)
    done: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    eval_next = False
    step = 0
    t0 = time.perf_counter()

    def send(plan: np.ndarray | None, sizes: list[int] | None, eval_pos: np.ndarray | None):
        extras: dict[str, np.ndarray | None] = {"plan": plan, "eval": eval_pos}
        if done is not None:
            extras.update(done_plan=done[0], done_sizes=done[1], grad=done[2])
        replies = fed.broadcast(m.STEP, m.make_content(**extras))
        for silo, reply in replies.items():
            silo_seconds[silo] += float(m.get_config(reply).get("seconds", 0.0))
        return replies

    for epoch in range(cfg.epochs):
        batches = batch_plan(train_pos, cfg.batch_size, epoch, seed)
        for chunk in chunks(batches, sizes_of_chunks):
            plan = np.concatenate(chunk).astype(np.int64)
            sizes = [len(b) for b in chunk]
            replies = send(plan, sizes, val_pos if eval_next else None)
            if eval_next:
                result.history.append(_evaluate(replies, top.value, y, val_pos, epoch, t0))
                eval_next = False
            partial = _summed(replies, "plan", len(plan))
            grads = top.gradients(partial, y[plan].astype(np.float64), sizes)
            done = (plan, np.asarray(sizes, dtype=np.int64), grads)
            step += 1
            if progress:
                progress("train", step, total_chunks, epoch=epoch + 1)
        eval_next = True
    # Apply the last chunk and read every position's contribution at the final weights.
    everyone = np.arange(n_positions, dtype=np.int64)
    replies = send(None, None, everyone)
    result.logits = top.value + _summed(replies, "eval", n_positions)
    result.history.append(
        _history_row(result.logits[val_pos], y[val_pos], cfg.epochs - 1, t0)
    )
    result.bias = top.value
    result.round_trips = step + 1
    result.silo_seconds = silo_seconds
    return result


def _evaluate(replies, bias: float, y, val_pos, epoch: int, t0: float) -> dict:
    z = bias + _summed(replies, "eval", len(val_pos))
    return _history_row(z, y[val_pos], epoch - 1, t0)


def _history_row(z: np.ndarray, y: np.ndarray, epoch: int, t0: float) -> dict:
    p = 1 / (1 + np.exp(-z))
    row = {
        "epoch": epoch + 1,
        "val_auc": auc(y, p),
        "val_loss": log_loss(y, p),
        "seconds": time.perf_counter() - t0,
    }
    log.info("epoch %d: val AUC %.4f, loss %.4f", row["epoch"], row["val_auc"], row["val_loss"])
    return row
