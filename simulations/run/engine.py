"""The one place that starts Flower's simulation engine.

`flwr.simulation.run_simulation` is marked deprecated but is the in-process entry in flwr 1.42;
keeping it behind `run_federation` lets a later Flower be swapped in here alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import tempfile
import warnings
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from clients.protocol.capture import CAPTURE_ENV
from clients.silo.app import SILO_FAULT
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
    Ray workers."""
    configure_environment()
    quiet_engine_logs()
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
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=silos,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": init_args,
            },
        )
    finally:
        import ray

        if ray.is_initialized():  # Flower shuts Ray down, unless it failed before starting
            ray.shutdown()


def _join_cluster(init_args: dict) -> None:
    """Join the cluster at RAY_ADDRESS with the silo-side settings in the job's environment.

    A private Ray's workers inherit this process's environment; a cluster's workers inherit
    the cluster's. Flower's backend starts Ray with only PYTHONPATH in the job's runtime
    environment (and cannot be given another), so Ray is started here, the way Flower would,
    plus SILO_ENV; Flower then uses this Ray (it starts one only when none runs) and shuts it
    down at the end."""
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    env_vars = {"PYTHONPATH": pythonpath, **{k: os.environ[k] for k in SILO_ENV
                                             if k in os.environ}}
    ray.init(runtime_env={"env_vars": env_vars}, **init_args)
