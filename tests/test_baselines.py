"""The experiment layer's baselines: the same results serially and over processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import process as futures_process

import numpy as np
import pandas as pd
import pytest
import torch

from server.config import AuthorityConfig
from server.config_keys import build
from simulations.analysis import baselines
from simulations.analysis.baselines import BaselineJob, JoinedData, one_thread, run_baselines


def _joined(n: int = 3000, seed: int = 0) -> JoinedData:
    rng = np.random.default_rng(seed)
    xs = {"payments": rng.normal(size=(n, 5)).astype(np.float32),
          "social": rng.normal(size=(n, 3)).astype(np.float32)}
    logit = 1.5 * xs["payments"][:, 0] - xs["social"][:, 1]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    split = pd.Series(rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2]))
    return JoinedData(xs=xs, y=y, split=split, ids=np.empty(0, dtype=object))


def _shared_blocks() -> set[str]:
    """The SharedMemory blocks on this machine (multiprocessing names them psm_*). Not all of
    /dev/shm: the suite's background runs leave and remove their own semaphores there while a
    test runs (joblib's sem.loky-*), which says nothing about the baselines."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


# The DP jobs' noise comes from the experiment's secret: fixed keys reproduce it.
JOBS = [BaselineJob("central", ("payments", "social")),
        BaselineJob("central_dp", ("payments", "social"), 1.0, bytes(32)),
        BaselineJob("payments", ("payments",), 1.0, bytes(range(32)))]


@pytest.mark.slow
def test_processes_reproduce_the_serial_baselines(monkeypatch):
    data, cfg = _joined(), AuthorityConfig()
    serial = run_baselines(data, JOBS, cfg, workers=1)
    monkeypatch.setattr(baselines, "PARALLEL_MIN_PEOPLE", 0)
    parallel = run_baselines(data, JOBS, cfg, workers=2)
    assert list(parallel) == [j.name for j in JOBS]
    for name in serial:
        assert parallel[name].metrics == serial[name].metrics
        assert [h["val_auc"] for h in parallel[name].history] == [
            h["val_auc"] for h in serial[name].history]
    assert serial["central"].metrics["auc"] > 0.75
    # DP noise costs something, and payments alone misses the social signal.
    assert serial["payments"].metrics["auc"] < serial["central"].metrics["auc"]


@pytest.mark.slow
def test_a_failing_job_reaches_the_caller_and_frees_shared_memory(monkeypatch):
    monkeypatch.setattr(baselines, "PARALLEL_MIN_PEOPLE", 0)
    bad = [JOBS[0], BaselineJob("nobody", ("device",))]  # no such silo in the joined data
    before = _shared_blocks()
    with pytest.raises(KeyError, match="device"):
        run_baselines(_joined(500), bad, AuthorityConfig(), workers=2)
    assert _shared_blocks() <= before


@pytest.mark.slow
def test_an_interrupt_stops_every_baseline_process_at_once(monkeypatch):
    """Ctrl-C while the jobs train: no job outlives the call, none queued starts, and the
    shared memory is freed."""
    monkeypatch.setattr(baselines, "PARALLEL_MIN_PEOPLE", 0)
    long = build(AuthorityConfig, {"train.epochs": 100, "train.batch_size": 64})  # ~minutes
    before = _shared_blocks()
    main = threading.main_thread().ident
    assert main is not None
    # Ctrl-C raises KeyboardInterrupt here, whatever handler the process had.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # Ctrl-C as a terminal sends it: SIGINT to the main thread, waiting for the jobs.
    threading.Timer(4.0, signal.pthread_kill, (main, signal.SIGINT)).start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_baselines(_joined(20_000), JOBS, long, workers=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - t0 < 9.0
    assert multiprocessing.active_children() == []
    assert _shared_blocks() <= before


def test_baseline_workers_leave_ctrl_c_to_the_main_process():
    with baselines._pool(1) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN


def test_a_stop_ends_a_worker_started_before_the_pool_recorded_it():
    """The executor starts a worker, then records it: Ctrl-C between the two left a worker
    that no shutdown knew of (a CI run caught it alive after the interrupt)."""
    pool = baselines._pool(1)
    orphan = pool._mp_context.Process(
        target=futures_process._process_worker,
        args=(pool._call_queue, pool._result_queue, None, (), None))
    orphan.start()
    pool._call_queue.put(futures_process._CallItem(0, os.getpid, (), {}))
    assert pool._result_queue.get().result == orphan.pid  # it is up and waiting
    baselines._stop(pool)
    assert not orphan.is_alive()
    assert orphan not in multiprocessing.active_children()


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
