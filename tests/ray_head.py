"""One Ray head for the test session's engine runs, started on first use.

A `fedscore run` that starts its own Ray spends seconds bringing up and tearing down Ray's
control plane (GCS, raylet, agents): 5-9 s of a 20-30 s run, measured. The suite's foreground
engine runs come one after another, so they join one private head instead, through
RAY_ADDRESS, as a user joins a cluster (docs/deployment.md). Each run is still its own Ray
job with its own workers and actors.

The head is as private as a run's own Ray: loopback only, token authentication with a fresh
token (passed to our subprocesses in their environment, never on a command line or on disk),
a private temp dir. It is stopped at the end of the session by signalling its process group,
which holds only the processes it started (never `ray stop`, which would end every Ray of
this user on the machine).

Runs that check the private Ray itself (tests/test_security_machine.py) do not join it; runs
beside the foreground's (tests/background.py) join their lane's own head (LANE_HEADS).
FEDSCORE_TEST_PRIVATE_RAY=1 turns the heads off for a whole session.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.run.engine import SILO_ENV
from tests import priority
from tests.zygote import Zygote

OFF_ENV = "FEDSCORE_TEST_PRIVATE_RAY"
LOOPBACK = "127.0.0.1"
STARTUP_SECONDS = 120
WORKER_PORTS = 200  # a head's range of worker and driver ports (it serves one run at a time)
_SLOTS = 20  # of three ranges each, from 20000 to 31999
_held_slot: list[int] = []  # the locked file of this session's slot, held until it ends


def _ports_base() -> int:
    """Where this session's three ranges start: below Linux's ephemeral ports (32768 on) and
    above Ray's default range (10002-19999, which private-Ray runs use), in a slot no other
    test session on the machine holds (a lock file each): two sessions at fixed ranges (a fast
    loop beside a full suite) took the same ports, and the second one's runs failed to reach
    their heads."""
    start = os.getpid() % _SLOTS
    for i in range(_SLOTS):
        slot = (start + i) % _SLOTS
        if _held_slot and _held_slot[0] == slot:
            return 20000 + slot * 3 * WORKER_PORTS
        fd = os.open(f"/tmp/fedscore-test-ports-{os.getuid()}-{slot}.lock",
                     os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_slot[:] = [slot, fd]
        return 20000 + slot * 3 * WORKER_PORTS
    return 20000 + start * 3 * WORKER_PORTS  # every slot taken: share one
# prctl(PR_SET_PDEATHSIG, SIGTERM), then exec the command (the setting survives exec).
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; "
                    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
                    "os.execvp(sys.argv[1], sys.argv[1:])")


class _Head:
    def __init__(self, range_index: int, *, background: bool = False) -> None:
        # Each head's workers and drivers take ports from a range of their own: Ray's default
        # range (10002-19999) is per cluster, and two heads running at once gave one driver
        # port 10002 while the other's process held it ("Address already in use", the raylet
        # check failed and the run died).
        self.range_index = range_index
        # A lane's head: its workers yield the CPU to the foreground (tests/priority.py).
        self.background = background
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.temp: Path | None = None
        # Forks the head's runs from one process that imported the CLI (tests/zygote.py).
        self.zygote: Zygote | None = None
        self._port = 0
        self._listening = False

    @staticmethod
    def off() -> bool:
        return os.environ.get(OFF_ENV) == "1" or bool(os.environ.get("RAY_ADDRESS"))

    def join_env(self) -> dict[str, str]:
        """The environment that makes an engine run join the head (started now if needed);
        empty when the head is off or the caller already chose a cluster."""
        if self.off():
            return {}
        if self.proc is None:
            self.spawn()
        if not self._listening:
            assert self.proc is not None
            _wait_for_port(self._port, self.proc)
            self._listening = True
        return dict(self.env)

    def forking(self, *, wait: bool = False) -> Zygote | None:
        """This head's zygote if it is ready to fork its runs (tests/zygote.py), else None: a
        command then starts a process of its own, as before the zygote, rather than wait for
        it (`wait=True` waits). The zygote starts once the agents of this head and of the
        lanes' heads are up: a raylet aborts when its dashboard agent has not written its port
        within 15 s (hard-coded, ray-project/ray#65983), and at the suite's start zygotes
        importing torch beside two starting heads made both lane heads' agents late in a CI.
        The lanes wait (conftest `_launch`); the foreground's first commands do not."""
        if self.zygote is None:
            return None
        if not self.zygote.started():
            heads = [self, *LANE_HEADS]
            if wait:
                wait_for_agents(heads)
            elif not all(head.agents_up() for head in heads):
                return None
            self.zygote.start()
        ready = self.zygote.ready() if wait else self.zygote.ready(timeout=0)
        return self.zygote if ready else None

    def agents_up(self) -> bool:
        """Whether the head's raylet has its agents (each writes its port to a file in the
        session directory once it listens), or the head has ended (it will not have them)."""
        if self.proc is None or self.proc.poll() is not None or self.temp is None:
            return True
        files = {path.name.split("_port_")[0] for path in self.temp.glob("session_*/*_port_*")}
        return {"dashboard_agent_listen", "runtime_env_agent"} <= files

    def spawn(self) -> None:
        """Start the head without waiting for it. From the main thread: the head is told to
        end with the thread that started it (PR_SET_PDEATHSIG follows the thread, not the
        process), and a background run's thread ends before the session does."""
        if self.off() or self.proc is not None:
            return
        # Short path: Ray's socket paths must stay under ~107 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix="fs-ray-", dir="/tmp"))
        port = _free_port()
        worker_ports = _ports_base() + self.range_index * WORKER_PORTS
        auth = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # Node address loopback, servers bound to it (as engine.LOOPBACK_ENV).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        ray = Path(sys.executable).with_name("ray")
        command = [str(ray) if ray.exists() else "ray", "start", "--head", "--block",
                   f"--node-ip-address={LOOPBACK}", f"--port={port}",
                   # As many CPUs as a test run's private Ray has: one worker
                   # (FEDSCORE_ENGINE_WORKERS=1 in conftest.ENGINE_ENV), so a run makes as
                   # many actors either way.
                   "--num-cpus=1", "--num-gpus=0",
                   "--include-dashboard=false", "--disable-usage-stats",
                   f"--min-worker-port={worker_ports}",
                   f"--max-worker-port={worker_ports + WORKER_PORTS - 1}",
                   f"--temp-dir={self.temp}"]
        # Every worker of every job inherits the head's environment, and a job's runtime
        # environment can add variables, not remove them: a silo setting (a test's injected
        # fault, a capture directory) set while the head started would reach every later run.
        # (It did once the first engine run of the suite became the faulty-silo run.)
        env = {k: v for k, v in os.environ.items() if k not in SILO_ENV}
        env.update(auth, RAY_USAGE_STATS_ENABLED="0")
        if self.background:
            env.update(priority.background_env())
        # Its own session, so that ending its process group ends only what it started; and
        # SIGTERM when this process dies, even killed (`ray start --block` then ends every
        # process it started), so an interrupted suite leaves no Ray behind.
        self.proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, *command],
                                     env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.env = {**auth, "RAY_ADDRESS": f"{LOOPBACK}:{port}"}
        self._port = port
        # Ray reads its authentication settings as it loads: the zygote has the head's. It
        # starts on first use, once every head is up (`forking`).
        self.zygote = Zygote({**env, **self.env})

    def stop(self) -> None:
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # what outlived it: workers, agents
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc, self._listening = None, False
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_agents(heads: list[_Head]) -> None:
    """Until each of `heads` that was started has its agents up (or has ended), at most
    STARTUP_SECONDS."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and not all(head.agents_up() for head in heads):
        time.sleep(0.2)


def _wait_for_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the test session's Ray head exited with {proc.returncode}; "
                               f"set {OFF_ENV}=1 to give every run a private Ray")
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the test session's Ray head did not listen on port {port} within "
                       f"{STARTUP_SECONDS} s")


HEAD = _Head(range_index=0)
# One head per background lane (tests/background.py): a run beside the foreground's (or beside
# the other lane's) must not wait for the foreground head's one CPU. Each lane runs one
# command at a time, so each head serves one run at a time, as HEAD does.
LANE_HEADS = (_Head(range_index=1, background=True), _Head(range_index=2, background=True))


def stop_all() -> None:
    for head in (HEAD, *LANE_HEADS):
        head.stop()
