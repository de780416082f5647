"""Baselines that only the experiment layer can compute: it sees every party's table.

`central`: the same model (one bottom model per silo, summed plus a bias, or under an MLP head
in `concat` mode), the same
initialisation, split, epochs and batch plan, trained in one process on the joined data with no
staleness. `payments_only`: the payments silo's bottom model alone. Both are calibrated and
scored exactly like the federated model. A credit analyst's references on the same split
(central gradient boosting, a central WoE scorecard) are in simulations/analysis/references.py.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import secrets
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing.context import ForkServerContext, ForkServerProcess
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import pandas as pd
import torch

from clients.protocol.dp_sgd import make_private, mark_empty_batch, noised_step
from clients.protocol.model import ModelSpec
from clients.protocol.schema import AUTHORITY, federation_silos, silo_salt
from clients.silo.data import load_silo
from clients.silo.trainer import build
from crypto.at_rest import Keystore
from crypto.identity import keyed_refs
from crypto.secret_random import SecretRandom, generator_from_key
from server.config import AuthorityConfig
from server.labels import load_labels
from server.metrics import summary
from server.scores_file import PEPPER_FILE
from server.scoring import Platt
from server.top import build_head, prior_logit
from server.training import batch_plan
from simulations.data.paths import Parties

log = logging.getLogger(__name__)

# Below this many aligned people the baselines take seconds; starting processes that import
# torch and Opacus (about 4 s each) would cost more than it saves.
PARALLEL_MIN_PEOPLE = 200_000


@dataclass
class JoinedData:
    """The aligned people in the federated run's position order, with every silo's features."""

    xs: dict[str, np.ndarray]
    y: np.ndarray
    split: pd.Series  # "train" / "val" / "test" per position
    ids: np.ndarray  # E.164, for joining with the generator's truth; never written out

    def positions(self, name: str) -> np.ndarray:
        return np.flatnonzero((self.split == name).to_numpy())


def join_parties(parties: Parties, scores: pd.DataFrame, ref_hash: str = "sha256",
                 store: Keystore | None = None) -> JoinedData:
    """Rebuild the federated run's rows from the party tables through the keyed references
    (HMAC with `ref_hash`, as the run wrote them)."""
    auth_ids, labels = load_labels(parties.party(AUTHORITY), store)
    pepper = parties.party(AUTHORITY).joinpath(PEPPER_FILE).read_bytes()
    refs = keyed_refs(auth_ids.to_numpy(), pepper, ref_hash)
    rows = pd.Index(refs).get_indexer(scores["subject_ref"])
    if (rows < 0).any():
        raise ValueError("scores.parquet names people the authority's table does not hold")
    ids = auth_ids.to_numpy()[rows]
    xs = {}
    for silo in federation_silos(parties.root):
        data = load_silo(parties.party(silo), silo, store)
        silo_rows = pd.Index(data.ids.to_numpy()).get_indexer(ids)
        xs[silo] = data.x[silo_rows]
    return JoinedData(xs=xs, y=labels[rows].astype(np.float64),
                      split=scores["split"].astype(str), ids=ids)


@dataclass
class BaselineResult:
    metrics: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _Joint(torch.nn.Module):
    """The whole model in one module, so Opacus can clip each person's whole gradient: the
    silos' parts summed plus a bias (`sum`), or a head over their embeddings (`concat`)."""

    def __init__(self, parts: Sequence[torch.nn.Module], prior: float,
                 head: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self.head = head
        if head is None:
            self.bias = torch.nn.Linear(1, 1, bias=False)
            with torch.no_grad():
                self.bias.weight.fill_(prior_logit(prior))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        outs = [p(x) for p, x in zip(self.parts, xs, strict=True)]
        if self.head is not None:
            return self.head(torch.cat(outs, dim=1))
        return self.bias(torch.ones(len(xs[0]), 1)).squeeze(-1) + sum(outs)


def train_central(
    data: JoinedData,
    silos: tuple[str, ...],
    cfg: AuthorityConfig,
    noise_multiplier: float = 0.0,
    noise_key: bytes = b"",
    plan_keys: tuple[bytes, ...] = (),
) -> BaselineResult:
    """Train the summed bottom models of `silos` jointly; metrics on the test positions.

    With `noise_multiplier` > 0 this is central DP-SGD (Opacus) at the federated run's
    combined epsilon: pass the run's JOINT noise multiplier; one clip over each person's whole
    gradient, where the federation clips each party's part separately and noises each at
    sqrt(K) times the joint multiplier. A simulation-only reference: its batch plans replay the
    authority's (`plan_keys`, one stream key per epoch, which the experiment layer derives from
    the authority's keystore; the public seed's when empty), its noise comes from the
    experiment's secret `noise_key` (32 bytes; a fresh one when empty).
    """
    t0 = time.perf_counter()
    concat = cfg.aggregation.mode == "concat"
    spec = ModelSpec(cfg.model.hidden, cfg.train.lr, cfg.train.weight_decay, cfg.seed,
                     outputs=cfg.model.embedding_dim if concat else 1)
    # Same salts as the silos use, so the central and federated models start identical.
    parts = [build(data.xs[s].shape[1], spec, silo_salt(s))[0] for s in silos]
    xs = [torch.from_numpy(data.xs[s]) for s in silos]
    y = torch.from_numpy(data.y).float()
    train, val, test = (data.positions(n) for n in ("train", "val", "test"))
    prior = float(data.y[train].mean())
    head = build_head(len(silos), spec, cfg.model.top_hidden, prior) if concat else None
    model = _Joint(parts, prior, head)
    # Adam keeps its state per parameter, so one Adam over everything is the same optimiser as
    # the federation's one per party.
    opt: torch.optim.Optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    dp = noise_multiplier > 0
    module: torch.nn.Module = model
    if dp:
        q = min(1.0, cfg.train.batch_size / len(train))
        module, opt = make_private(model, opt, noise_multiplier=noise_multiplier,
                                   max_grad_norm=cfg.privacy.max_grad_norm,
                                   expected_batch=max(1, round(q * len(train))))
    noise = SecretRandom(noise_key or secrets.token_bytes(32))
    steps = 0
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def logits(idx: np.ndarray, net: torch.nn.Module) -> torch.Tensor:
        return net([x[idx] for x in xs])

    history: list[dict] = []
    kept: _Kept | None = None  # without DP, the best validation epoch so far
    for epoch in range(cfg.train.epochs):
        module.train()
        plans = (generator_from_key(plan_keys[epoch]) if plan_keys
                 else np.random.default_rng([cfg.seed, 0xBA7C, epoch]))
        for batch in batch_plan(train, cfg.train.batch_size, plans, poisson=dp):
            opt.zero_grad(set_to_none=True)
            if len(batch):
                loss_fn(logits(batch, module), y[batch]).backward()
            elif dp:
                mark_empty_batch(model)
            if dp:
                noised_step(opt, noise=noise.generator("baseline-noise", steps))
                steps += 1
            else:
                opt.step()
        with torch.no_grad():
            z_val = logits(val, model).numpy()
        history.append({"epoch": epoch + 1, **val_metrics(data.y[val], z_val),
                        "seconds": time.perf_counter() - t0})
        kept = kept if dp or not cfg.train.keep_best else _keep_if_best(kept, history[-1], model)
    if kept is not None:
        model.load_state_dict(kept.weights)
        history[kept.epoch - 1]["kept"] = True
    with torch.no_grad():
        z = logits(np.arange(len(data.y)), model).numpy().astype(np.float64)
    calibrate = Platt.fit(z[val], data.y[val])
    metrics = summary(data.y[test], calibrate(z[test]))
    return BaselineResult(metrics=metrics, history=history, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class _Kept:
    epoch: int
    loss: float
    weights: dict


def _keep_if_best(kept: _Kept | None, row: dict, model: torch.nn.Module) -> _Kept | None:
    """As the federation does without DP (server/training.py): the epoch of the best
    validation log loss is kept, the first of equals; with DP the caller keeps the last."""
    if kept is not None and row["val_loss"] >= kept.loss:
        return kept
    return _Kept(row["epoch"], row["val_loss"], copy.deepcopy(model.state_dict()))


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for the block. These models' steps are far too small for two: with
    the other core busy, central DP on 100,000 people took 3.5 s on one thread against 15.6 s
    on two (OpenMP threads waiting on each other; bench/RESULTS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class BaselineJob:
    """One baseline: the model over `silos`, with DP-SGD when `noise_multiplier` > 0."""

    name: str
    silos: tuple[str, ...]
    noise_multiplier: float = 0.0
    noise_key: bytes = b""  # the DP noise's stream key (the experiment's secret)
    plan_keys: tuple[bytes, ...] = ()  # per epoch: the authority's batch-plan stream keys


def run_baselines(data: JoinedData, jobs: list[BaselineJob], cfg: AuthorityConfig,
                  workers: int | None = None) -> dict[str, BaselineResult]:
    """Train every job; {name: result}. From PARALLEL_MIN_PEOPLE aligned people the jobs run
    in `workers` processes (default: the cores) that read the features from shared memory,
    so nothing is copied per job and nothing touches the disk."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) <= 1 or len(data.y) < PARALLEL_MIN_PEOPLE:
        with one_thread():
            return {job.name: train_central(data, job.silos, cfg, job.noise_multiplier,
                                            job.noise_key, job.plan_keys) for job in jobs}
    with ExitStack() as stack:
        shared = {}
        for key, array in (*((f"x.{s}", x) for s, x in data.xs.items()), ("y", data.y)):
            shm = SharedMemory(create=True, size=max(array.nbytes, 1))
            stack.callback(shm.unlink)
            stack.callback(shm.close)
            np.ndarray(array.shape, array.dtype, buffer=shm.buf)[...] = array
            shared[key] = (shm.name, array.shape, array.dtype.str)
        split = data.split.astype("category")
        pool = stack.enter_context(_pool(min(workers, len(jobs))))
        log.info("baselines: %d jobs in %d processes", len(jobs), min(workers, len(jobs)))
        # The costliest first (DP over every silo), so the short ones fill in at the end.
        order = sorted(jobs, key=lambda j: (j.noise_multiplier > 0, len(j.silos)), reverse=True)
        before = set(multiprocessing.active_children())
        try:  # Ctrl-C may come while the workers start: the submissions start them
            futures = {job.name: pool.submit(_shared_job, shared, split, job, cfg)
                       for job in order}
            return {job.name: futures[job.name].result() for job in jobs}
        except BaseException:
            _stop(pool, spared=before)
            raise


def _pool(workers: int) -> ProcessPoolExecutor:
    """Workers that ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and
    the main process alone decides what it means (it ends them, `_stop`); otherwise each
    worker printed its own KeyboardInterrupt traceback."""
    return ProcessPoolExecutor(workers, mp_context=_RecordingForkServer(),
                               initializer=signal.signal,
                               initargs=(signal.SIGINT, signal.SIG_IGN))


def _stop(pool: ProcessPoolExecutor, spared: set[BaseProcess] | None = None) -> None:
    """Ctrl-C or a failed job: no queued job may start and no running one outlive the call.
    Leaving the pool's block alone would wait for both (minutes at a million people). Python
    3.11's executor has no way to end its workers (3.14 adds terminate_workers), hence the
    processes its context recorded."""
    processes = _workers(pool)
    pool.shutdown(wait=False, cancel_futures=True)
    # Two CI runs still found one worker alive after the interrupt, once the pool's own record
    # was used: every child started since the pool began (`spared`: those alive before it) is
    # this call's, as the baselines run alone in their process.
    if spared is not None:
        processes += [p for p in multiprocessing.active_children()
                      if p not in spared and p not in processes]
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)


def _workers(pool: ProcessPoolExecutor) -> list[BaseProcess]:
    """Every process the pool started, including one that Ctrl-C caught after the executor
    started it and before it recorded it (it does the two in that order)."""
    started = getattr(pool._mp_context, "started", [])
    return [p for p in started if p.pid is not None]


class _RecordingForkServer(ForkServerContext):
    """Workers forked from Python's fork server, recording each process it makes (see
    _workers). The server is a clean single-threaded process (no Ray, Flower or torch threads
    of the run to fork), started once per process and kept, which has imported this module:
    a worker starts without importing torch, Opacus and the project again (4.3 s of CPU each
    when spawned), and a second pool in the same process pays nothing."""

    def __init__(self) -> None:
        self.started: list[BaseProcess] = []
        self.set_forkserver_preload([__name__])  # read when the server starts, once

    def Process(self, *args: Any, **kwargs: Any) -> ForkServerProcess:  # type: ignore[override]  # noqa: N802
        process = ForkServerProcess(*args, **kwargs)
        self.started.append(process)
        return process


def _shared_job(shared: dict, split: pd.Series, job: BaselineJob, cfg: AuthorityConfig
                ) -> BaselineResult:
    """A pool worker: attach the shared arrays and train one baseline on one thread."""
    with ExitStack() as stack:
        arrays = {}
        for key, (name, shape, dtype) in shared.items():
            block = SharedMemory(name=name)
            stack.callback(block.close)
            arrays[key] = np.ndarray(shape, np.dtype(dtype), buffer=block.buf)
        xs = {k.removeprefix("x."): v for k, v in arrays.items() if k.startswith("x.")}
        data = JoinedData(xs=xs, y=arrays.pop("y"), split=split.astype(str),
                          ids=np.empty(0, dtype=object))
        with one_thread():
            result = train_central(data, job.silos, cfg, job.noise_multiplier, job.noise_key,
                                   job.plan_keys)
        # The views must go before the blocks close, or close() finds them still exported.
        del data, xs, arrays
        return result


def val_metrics(y: np.ndarray, z: np.ndarray) -> dict:
    """Validation AUC and log loss of logits `z`, as every baseline's history records them."""
    s = summary(y, 1 / (1 + np.exp(-z)))
    return {"val_auc": s["auc"], "val_loss": s["log_loss"]}
