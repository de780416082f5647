"""Engine commands forked from a process that imported the CLI once.

Every `fedscore` process spends seconds of CPU importing torch, Opacus, Flower and Ray before
it reads its first argument (4.3 s of CPU on a quiet core; the suite starts about fifty engine
runs, most of them in the background lanes that bound its time). A zygote imports the CLI
once and forks a child per command; the child takes the caller's standard streams, working
directory and whole environment, then runs `python -m simulations.cli ARGS` as the
interpreter would (runpy, `__main__`), exits through the interpreter's own shutdown, and the
zygote reports its exit code. What the command does is the same as in a fresh process: only
the imports are shared, read-only, copy on write.

What differs from a fresh process, and why it does not matter here:
- an environment variable read at IMPORT time keeps the zygote's value. The project reads
  none (its settings are read when used); of its libraries, OpenMP reads OMP_NUM_THREADS as
  torch loads and Ray its auth settings: each zygote is started with the environment its
  commands share (conftest.ENGINE_ENV, and one zygote per Ray head, with that head's
  settings), and a request whose such variables differ is refused (`_FIXED`);
- /proc/PID/environ shows the zygote's environment, so tests/priority.py's watcher cannot see
  a command's background marker: a background lane's zygote carries the marker itself, so
  the watcher renices it before it forks, and its children inherit its nice value;
- its command line is the zygote's (`python -m tests.zygote`), never the command's arguments.

The zygote is single-threaded (forking a threaded process copies locks held by threads that do
not exist in the child): a select loop over the listening socket, the callers' connections and
a pipe that SIGCHLD wakes. One request per connection, on a SOCK_SEQPACKET Unix socket (message
boundaries kept): the JSON request with the three stream descriptors attached; the answers are
the child's pid, then its exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# Read by libraries as they load: a command must share the zygote's values.
_FIXED = ("OMP_NUM_THREADS", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
_ROOT = Path(__file__).resolve().parents[1]
_MAX_REQUEST = 1 << 20
_BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
_ZYGOTE_PID = os.getpid()  # set again in the zygote (`_serve`)
_PARENT_CHECK = 1.0  # seconds between the zygote's checks that the suite is still there


def _preload() -> None:
    """What every engine command imports before it starts: the CLI and the engine's modules."""
    import flwr.simulation  # noqa: F401
    import ray  # noqa: F401

    import simulations.cli.main
    import simulations.run.experiment  # noqa: F401


def _serve(path: str) -> dict:
    """The zygote's loop; returns only in a forked child, with its request."""
    import gc

    # Ctrl-C in the suite's terminal is for the commands, whose handlers are Python's default
    # again.
    global _ZYGOTE_PID
    _ZYGOTE_PID = os.getpid()
    suite = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    before = dict(os.environ)
    _preload()
    # What the libraries set in the environment as they loaded (GRPC_VERBOSITY, Ray's client
    # mode...): a fresh process keeps them for its whole life, so a command gets them too.
    added = {k: v for k, v in os.environ.items() if k not in before}
    gc.freeze()  # the children's collectors never walk (and so copy) the shared heap
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)  # the caller waits for this line: the imports are done
    while True:
        try:
            readable, _, _ = select.select([listener, wake_r], [], [], _PARENT_CHECK)
        except InterruptedError:
            continue
        # The suite is gone, even killed: end (the children, which the suite stops itself,
        # go on to their end). Not prctl(PR_SET_PDEATHSIG): that signal follows the THREAD
        # that started the zygote, and a lane's zygote is started by whichever thread asks
        # first (a lane's run, the thread that waits for the heads' agents), which ends long
        # before the suite: the zygote died with it, a command forked just before was killed,
        # and the lane's later commands ran in processes of their own.
        if os.getppid() != suite:
            os._exit(0)
        if wake_r in readable:
            os.read(wake_r, 4096)
            _reap(children)
        if listener not in readable:
            continue
        try:
            request = _fork(listener, children, (wake_r, wake_w))
        except OSError:  # this caller falls back to a process of its own; the rest go on
            continue
        if request is not None:
            return {**request, "added": added}


def _fork(listener: socket.socket, children: dict[int, socket.socket],
          pipe: tuple[int, int]) -> dict | None:
    """Take one request and fork its child: the request in the child, None in the zygote;
    OSError if the request could not be served (its caller falls back)."""
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        message, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
        request = json.loads(message)
        if len(fds) != 3:
            raise ValueError("a request carries the three standard streams")
        # No signal between fork and the child's own handlers: the zygote's SIGTERM handler
        # would end the child with 0, "success".
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        try:
            pid = os.fork()
        finally:
            if os.getpid() == _ZYGOTE_PID:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)
    except (OSError, ValueError):
        for fd in fds:  # never left open for the next children to inherit
            os.close(fd)
        conn.close()
        raise OSError("request refused") from None
    if pid == 0:  # the child: nothing of the zygote's loop stays open
        signal.set_wakeup_fd(-1)
        for sig, handler in ((signal.SIGCHLD, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL),
                             (signal.SIGINT, signal.default_int_handler)):
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)
        for sock in (listener, conn, *children.values()):
            sock.close()
        for fd in pipe:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        return request
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    with contextlib.suppress(OSError):  # a caller gone already: its child is reaped all the same
        conn.sendall(str(pid).encode())
    _reap(children)  # a child may have ended before it was listed
    return None


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
            conn.close()


def _child(request: dict) -> None:
    """Become `python -m simulations.cli ARGS` in the caller's directory and environment."""
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**request["added"], **request["env"]})
    sys.argv = ["-m", *request["args"]]
    runpy.run_module("simulations.cli", run_name="__main__", alter_sys=True)


class Zygote:
    """One zygote process, started by `start()` with the environment its commands share."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self.path = ""
        self._lock = threading.RLock()  # the lanes' threads and the foreground share it

    def started(self) -> bool:
        return self.proc is not None

    def start(self) -> None:
        with self._lock:
            if self.proc is None:
                self._start()

    def _start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="fs-zygote-", dir="/tmp")
        self.path = os.path.join(self._dir, "socket")
        # Not the suite's terminal: rich decides colours and width as the CLI's console is
        # made, here at import, from this process's stderr and environment.
        env = {k: v for k, v in self.env.items() if k not in ("COLUMNS", "LINES")}
        with open(os.path.join(self._dir, "stderr"), "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.zygote", self.path],
                env={**env, "PYTHONPATH": str(_ROOT)}, cwd=_ROOT,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)

    def ready(self, timeout: float = 300) -> bool:
        """Wait until the zygote has imported what it shares; False if it failed to, or (at
        `timeout` 0) if it is still importing."""
        with self._lock:
            return self._ready(timeout)

    def _ready(self, timeout: float) -> bool:
        if self.proc is None:
            return False
        if self.proc.stdout is not None:
            waited, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not waited and timeout == 0:
                return False  # still importing: ask again later
            line = self.proc.stdout.readline() if waited else ""
            self.proc.stdout.close()
            self.proc.stdout = None
            if line.strip() != "ready":
                self.stop()
                return False
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, args: Sequence[str], *, cwd: Path | str, env: Mapping[str, str],
              stdin: int, stdout: int, stderr: int) -> Forked:
        """`python -m simulations.cli ARGS` forked from the zygote, with these streams;
        ValueError if the environment differs in what libraries read as they load, OSError
        if the zygote is gone."""
        for key in _FIXED:
            if env.get(key) != self.env.get(key):
                raise ValueError(f"{key} differs from the zygote's")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(self.path)
            request = json.dumps({"args": list(args), "cwd": str(cwd), "env": dict(env)})
            socket.send_fds(sock, [request.encode()], [stdin, stdout, stderr])
            pid = int(sock.recv(64))
            return Forked(pid, sock.detach())

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class Forked:
    """A forked command as subprocess.Popen shows one: pid, poll, wait, terminate, kill."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._sock = socket.socket(fileno=fd)
        # A lane's thread waits while the main thread may poll or stop it.
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._answer(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._answer(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"fedscore (pid {self.pid})", timeout or 0)
        return code

    def _answer(self, timeout: float | None) -> int | None:
        """The exit code once the zygote reported it, waiting at most `timeout` seconds (in
        slices, so that a poll from another thread is never locked out for long)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.returncode is not None:
                    return self.returncode
                ready, _, _ = select.select([self._sock], [], [], 0.2 if deadline is None
                                            else max(0, min(0.2, deadline - time.monotonic())))
                if ready:
                    data = self._sock.recv(64)
                    if not data:  # the zygote ended before its child: end the child too
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.pid, signal.SIGKILL)
                    self.returncode = int(data) if data else -signal.SIGKILL
                    self._sock.close()
                    return self.returncode
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def launch(zygote: Zygote | None, args: Sequence[str], *, cwd: Path | str,
           env: Mapping[str, str], stdin: int, stdout: int, stderr: int
           ) -> Forked | subprocess.Popen:
    """The command forked from `zygote` when it can take it, else in a process of its own."""
    if zygote is not None and zygote.ready():
        with contextlib.suppress(ValueError, OSError):
            return zygote.spawn(args, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
                                stderr=stderr)
    return subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], cwd=cwd,
                            env=dict(env), stdin=stdin, stdout=stdout, stderr=stderr)


def run(zygote: Zygote | None, args: Sequence[str], *, cwd: Path, env: Mapping[str, str],
        timeout: float, input: str | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(python -m simulations.cli ARGS, capture_output=True, text=True) through
    `launch`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryFile() as given, open(os.devnull, "rb") as null:
        if input is not None:
            given.write(input.encode())
            given.seek(0)
        proc = launch(zygote, args, cwd=cwd, env=env,
                      stdin=given.fileno() if input is not None else null.fileno(),
                      stdout=out.fileno(), stderr=err.fileno())
        try:
            code = proc.wait(timeout)
        except BaseException:  # a timeout, or the test aborted (pytest-timeout): as subprocess.run
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "simulations.cli", *args], code,
            out.read().decode(errors="replace"), err.read().decode(errors="replace"))


if __name__ == "__main__":
    _child(_serve(sys.argv[1]))
