"""The one place that starts Flower's simulation engine.

`flwr.simulation.run_simulation` is marked deprecated but is the in-process entry in flwr 1.42;
keeping it behind `run_federation` lets a later Flower be swapped in here alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from clients.protocol.capture import CAPTURE_ENV
from clients.silo.training import SILO_FAULT
from crypto.private_files import ensure_private_dir
from server.config import ConfigError

log = logging.getLogger(__name__)

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    # Ray would otherwise warn about, and later change, how it handles accelerator env vars.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def private_engine_home() -> Path:
    """A per-user directory for Flower and Ray state, kept out of ~/.flwr and /tmp/ray.

    Ray's socket paths must stay under ~107 bytes, so this lives directly under the temp dir.
    The temp dir is shared: a directory of that name made by someone else, open to others or
    a symlink is refused (it would collect our sockets, Ray's session and Flower's state).
    """
    home = Path(tempfile.gettempdir()) / f"fedscore-{os.getuid()}"
    return ensure_private_dir(home, "the engine's private directory")


# Ray's control plane (GCS, raylet, workers, runtime-env agent) listens on TCP. A private Ray
# has no other machine to talk to, so it binds loopback only and every RPC carries a fresh
# per-process token (Ray >= 2.52 token authentication), which a local user without our
# environment cannot read: /proc/PID/environ is readable by its owner only.
LOOPBACK_ENV = {
    # Ray resolves a node address of 127.0.0.1 to the machine's outward address unless
    # "cluster mode" is off; off, the node address is loopback and Ray 2.55's servers bind
    # to it instead of 0.0.0.0 (checked by tests/test_security_machine.py).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
}
LOOPBACK = "127.0.0.1"


# What a silo's ClientApp reads from its environment. A private Ray's workers inherit the
# driver's environment; a joined cluster's workers inherit the cluster's, so these travel in
# the job's runtime environment (never a secret: Ray's job table shows them).
SILO_ENV = (CAPTURE_ENV, SILO_FAULT)


def _private_ray() -> bool:
    """A Ray of our own (not a cluster joined through RAY_ADDRESS, which has its own network
    and authentication settings: docs/deployment.md)."""
    return not os.environ.get("RAY_ADDRESS")


def configure_environment() -> None:
    home = private_engine_home()
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for key, sub in (("FLWR_HOME", "flwr"), ("RAY_TMPDIR", "ray")):
        # Inside the checked home nobody else can reach them, whatever their own mode (Ray
        # makes its directories 0755).
        os.environ.setdefault(key, str(home / sub))
    if _private_ray():
        # Forced, not defaulted: an inherited RAY_AUTH_MODE=disabled would silently open the
        # control plane to every local user.
        os.environ.update(LOOPBACK_ENV)
        if os.environ["RAY_AUTH_MODE"] == "token" and not (
                os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            # Fresh for each process that starts a Ray: nothing on disk to steal or reuse,
            # and Ray hands it to its own processes through their environment.
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


_VERBOSE = False


def quiet_engine_logs(verbose: bool | None = None) -> None:
    """Flower and Ray log a great deal at INFO; keep their errors only (unless verbose).

    Called again before every federation: importing Opacus resets the `flwr` logger."""
    global _VERBOSE
    if verbose is not None:
        _VERBOSE = verbose
    level = logging.INFO if _VERBOSE else logging.ERROR
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="flwr")


WORKERS_ENV = "FEDSCORE_ENGINE_WORKERS"


def engine_workers(silos: int) -> int:
    """Ray workers (one silo message at a time each): one per core, at most one per silo.

    More workers than cores only adds memory (each worker holds torch and the silos' tables)
    and contention: at 100,000 people, 3 workers on 2 cores peaked at 3.0 GB against 2.4 GB for
    2, for the same time (bench/RESULTS.md). FEDSCORE_ENGINE_WORKERS overrides."""
    asked = os.environ.get(WORKERS_ENV, "").strip()
    if asked:
        if not asked.isdigit() or int(asked) < 1:
            raise ConfigError(f"{WORKERS_ENV}={asked!r}: give a whole number of workers >= 1")
        return int(asked)
    return max(1, min(silos, len(os.sched_getaffinity(0))))


def run_federation(server_app: ServerApp, client_app: ClientApp, silos: int) -> None:
    """Run the apps in-process: one virtual SuperNode per silo, served by `engine_workers`
    Ray workers.

    Ctrl-C (SIGINT) ends the federation the way a finished run ends it, then raises
    KeyboardInterrupt: the authority returns at its next message (`_StoppableGrid`; its
    ledger and last checkpoint written), and Flower stops its workers and shuts Ray down
    (ours: every process it started; a joined cluster: our job, whose actors and workers the
    cluster then ends). Flower runs the ServerApp in a thread of its own that the signal never
    reaches and Python waits for at exit: without the stop, that thread went on waiting for
    replies from silos that were gone until `reply_timeout` (600 s)."""
    configure_environment()
    quiet_engine_logs()
    # After configure_environment (Ray reads some variables at import), and seconds of
    # imports that commands without the engine never pay.
    from flwr.simulation import run_simulation

    if _private_ray():
        # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import: a caller that imported
        # Ray before configure_environment would otherwise get a node on the outward address.
        from ray._private import ray_constants

        if getattr(ray_constants, "ENABLE_RAY_CLUSTER", False):
            ray_constants.ENABLE_RAY_CLUSTER = False

    init_args: dict = {"logging_level": logging.ERROR, "log_to_driver": False,
                       "include_dashboard": False}
    if _private_ray():
        # A private Ray with one worker per core (engine_workers); torch in each is pinned to
        # one thread. With RAY_ADDRESS set, Ray joins that cluster, which has its own
        # resources (docs/deployment.md). Loopback only, dashboard off (LOOPBACK_ENV).
        init_args.update(num_cpus=engine_workers(silos), num_gpus=0,
                         _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK)
    else:
        _join_cluster(init_args)
    stop = threading.Event()
    try:
        with _interrupt_sets(stop):
            run_simulation(
                server_app=_stoppable(server_app, stop),
                client_app=client_app,
                num_supernodes=silos,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": init_args,
                },
            )
    except BaseException:
        # However the engine ended (a second Ctrl-C, a crash), the ServerApp thread must not
        # outlive it waiting for replies that will never come.
        stop.set()
        raise
    finally:
        import ray  # Ray's import is heavy and reads the environment: only with the engine

        # Flower shuts Ray down, unless it failed before starting. For a joined cluster this
        # ends our job (the cluster then ends its actors and workers), not the cluster.
        if ray.is_initialized():
            ray.shutdown()
    if stop.is_set():
        raise KeyboardInterrupt("the federation was interrupted")


@contextmanager
def _interrupt_sets(stop: threading.Event) -> Iterator[None]:
    """While the engine runs, the first SIGINT sets `stop` instead of raising
    KeyboardInterrupt wherever the main thread happens to be (inside Flower's thread pool,
    whose own clean-up would then shut Ray down under workers still using it); a second one
    raises at once. Signals reach the main thread only: elsewhere (an event loop's worker
    thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("interrupted: stopping the federation (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


class _Stopped(KeyboardInterrupt):
    """Raised in the ServerApp's thread by its next message once the run is interrupted: a
    KeyboardInterrupt, so no `except Exception` on the way records it as the run's failure."""


def _stoppable(app: ServerApp, stop: threading.Event) -> ServerApp:
    """`app` on a grid that refuses every call once `stop` is set. The authority then unwinds
    (its `finally` blocks write the ledger and the last checkpoint) and the ServerApp returns,
    which ends Flower's engine the way a finished run does: workers stopped, actors ended,
    Ray shut down."""
    outer = ServerApp()

    @outer.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            app(grid=_StoppableGrid(grid, stop), context=context)
        except _Stopped:
            log.info("the authority stopped at its next message")

    return outer


def interrupted(grid: Grid) -> bool:
    """Whether Ctrl-C stopped the engine: for a ServerApp that waits on something other than
    its grid (the score server waits on its socket), which would otherwise wait on. A grid of
    another engine (deployment) is never interrupted this way."""
    return isinstance(grid, _StoppableGrid) and grid.stop.is_set()


class _StoppableGrid(Grid):
    """The engine's grid, checking `stop` before every call. The authority polls for replies
    every few milliseconds, so it notices within one poll."""

    def __init__(self, inner: Grid, stop: threading.Event) -> None:
        self.inner = inner
        self.stop = stop

    def _check(self) -> None:
        if self.stop.is_set():
            raise _Stopped()

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        self._check()
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """As Flower's in-memory grid does it, but polling through `pull_messages` here, so
        the horizontal topology's rounds (server/horizontal.py) stop too."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            arrived = list(self.pull_messages(waiting))
            replies.extend(arrived)
            waiting -= {m.metadata.reply_to_message_id for m in arrived}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(getattr(self.inner, "pull_interval", 0.1))
        return replies


def _join_cluster(init_args: dict) -> None:
    """Join the cluster at RAY_ADDRESS with the silo-side settings in the job's environment.

    A private Ray's workers inherit this process's environment; a cluster's workers inherit
    the cluster's. Flower's backend starts Ray with only PYTHONPATH in the job's runtime
    environment (and cannot be given another), so Ray is started here, the way Flower would,
    plus SILO_ENV; Flower then uses this Ray (it starts one only when none runs) and shuts it
    down at the end."""
    import ray  # Ray's import is heavy and reads the environment: only with the engine

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    env_vars = {"PYTHONPATH": pythonpath, **{k: os.environ[k] for k in SILO_ENV
                                             if k in os.environ}}
    ray.init(runtime_env={"env_vars": env_vars}, **init_args)
