"""The deployment engine on one machine: a SuperLink with TLS and SuperNode authentication,
one SuperNode per silo, and the run submitted with `flwr run`, exactly as on separate machines
(docs/deployment.md) but on loopback.

Every process is started in its own session and stopped by PID, with its whole process group
(Flower's SuperExec and the per-message ClientApp processes live there), also on Ctrl-C, on
SIGTERM and on failure. Logs go to `<run dir>/deploy/`; credentials and Flower's own state to a
private directory beside the party tables (`<parties>.deploy/`), never into the run directory.

The app is built once into a snapshot there and pinned: each SuperNode runs only that bundle
(simulations/run/app_pin.py), and `flwr run` ships the snapshot, so an edit to the source tree
during the run cannot change what the silos execute.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from crypto.private_files import ensure_private_dir, replace_private, write_atomic
from crypto.tls import CredentialError, Credentials, write_credentials
from server.server_app import FAILURE_FILE, PROGRESS_PREFIX
from simulations.run import app_pin
from simulations.run.engine import QUIET_ENV

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
FEDERATION = "fedscore"
START_TIMEOUT = 60.0
STOP_GRACE = 10.0


class DeploymentError(RuntimeError):
    """The deployment could not start, or the run under it failed."""


def project_root() -> Path:
    """The Flower app's directory (`flwr run` builds the app bundle from it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise DeploymentError(
            f"no pyproject.toml in {root}: the deployment engine runs from a source checkout "
            "(git clone, then `pip install -e .`)"
        )
    return root


def snapshot_app(root: Path, dest: Path) -> tuple[Path, str]:
    """Build the app in `root` once and unpack the bundle into `dest/fedscore`: (that
    directory, its pin). Flower's builds are reproducible, so `flwr run` on the snapshot ships
    exactly the pinned bundle whatever happens to `root` meanwhile."""
    fab = app_pin.build_app(root)
    ensure_private_dir(dest, "the app snapshot directory")
    app = dest / "fedscore"
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(mode=0o700)
    with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
        for name in bundle.namelist():  # Flower's own bundle: relative names, no links
            if name.startswith(("/", "..")) or "/../" in name:
                raise DeploymentError(f"the app bundle names a file outside itself: {name}")
        bundle.extractall(app)
    return app, app_pin.app_hash(fab)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tools() -> Path:
    """Flower's executables live beside the running interpreter."""
    return Path(sys.executable).parent


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class Deployment:
    """What `start` brought up: a SuperLink and one SuperNode per silo, all on loopback."""

    silos: tuple[str, ...]
    parties: Path
    keystore: Path | None
    credentials: Credentials
    home: Path  # Flower's own state: FLWR_HOME for the flwr CLI
    logs: Path
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)
    nodes: dict[str, Process] = field(default_factory=dict)
    known: set[tuple[int, int]] = field(default_factory=set)  # (pid, start time)
    # The bundle every SuperNode accepts (None: any, as Flower does) and the app `flwr run`
    # ships (None: the source checkout).
    app_pin: str | None = None
    app_dir: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        # Flower starts helpers (flower-superexec, flwr-serverapp, ...) by name.
        path = f"{_tools()}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.home), "PATH": path,
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                # Flower's SuperExec checks for work once a second by default; each of our
                # round trips waits for it twice (SuperNode and SuperLink side).
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    # ---- processes ---------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str]) -> Process:
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as out:
            popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True,
            )
        proc = Process(name, popen, log_path)
        self.processes.append(proc)
        self.watch()
        # Atomic: Ctrl-C may land mid-write, and whoever cleans up after us reads this file.
        write_atomic(self.logs / "processes.json",
                     json.dumps({p.name: p.pid for p in self.processes}, indent=1) + "\n",
                     public=True, sync=False)
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def watch(self) -> None:
        """Note every descendant of the processes we started. Flower starts its SuperExec in a
        session of its own, and a SuperNode killed hard leaves its children to init; noting
        them while they are still ours lets `stop_all` end them too."""
        self.known |= process_tree([p.pid for p in self.processes])
        self.known |= marked_processes(self.home)

    def stop_all(self) -> None:
        """Stop everything we started: the run and the SuperNodes first, then the SuperLink
        (stopped first, it leaves SuperNodes retrying and its ServerApp orphaned for tens of
        seconds). SIGTERM, then SIGKILL after a grace period, to each process we started or saw
        below one; each is matched by PID and start time, so a reused PID is never signalled."""
        self.watch()
        below = {p.pid: process_tree([p.pid]) for p in self.processes}
        link = [p for p in self.processes if p.name == "superlink"]
        for stage in ([p for p in self.processes if p not in link], link):
            targets = set().union(*(below[p.pid] for p in stage)) if stage else set()
            if stage is link:  # with the SuperLink go whatever we saw that is left
                targets |= self.known
            self._end(stage, {t for t in targets if _same_process(t)})
        # Orphans of a process that died between two looks carry our private FLWR_HOME.
        stray = marked_processes(self.home)
        if stray:
            self._end([], stray)
        self.processes.clear()
        self.known.clear()

    def _end(self, stage: list[Process], targets: set[tuple[int, int]]) -> None:
        for pid, _ in targets:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(_same_process(t) for t in targets):
            for proc in stage:
                proc.popen.poll()  # reap our own children, or they linger as zombies
            time.sleep(0.1)
        for target in targets:
            if _same_process(target):
                _signal(target[0], signal.SIGKILL)
        for proc in stage:
            proc.popen.wait()

    # ---- bring-up ----------------------------------------------------------------------------

    def start_superlink(self) -> None:
        c = self.credentials
        # Before Flower makes it 0755. Inside `<parties>.deploy/` (checked private by
        # `deployment`) its own mode matters less; a fresh one is 0700 all the same.
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.link = self.spawn("superlink", [
            str(_tools() / "flower-superlink"),
            "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
            "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", HOST, "--port", str(self.port),
        ])
        _wait_for_tls(self.address, c.ca_cert, self.link)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{c.ca_cert}"\n'
        )

    def register(self, silo: str) -> None:
        """Add the silo's public key to the SuperLink: only registered nodes may connect."""
        self._flwr(["supernode", "register", str(self.credentials.node_public_key(silo)),
                    FEDERATION], f"register the {silo} SuperNode")

    def start_supernode(self, silo: str) -> Process:
        node_config = f'silo="{silo}" data-dir="{self.parties}"'
        if self.keystore is not None:
            node_config += f' keystore="{self.keystore}"'
        # The pin is the hash of public code, not a secret, so it may sit on the command line.
        launcher = [str(_tools() / "flower-supernode")] if self.app_pin is None else [
            sys.executable, "-m", "simulations.run.app_pin", "supernode",
            "--app-pin", self.app_pin, "--"]
        proc = self.spawn(f"supernode-{silo}", [
            *launcher,
            "--superlink", self.address,
            "--root-certificates", str(self.credentials.ca_cert),
            "--auth-supernode-private-key", str(self.credentials.node_key(silo)),
            "--node-config", node_config,
            "--port", str(free_port()),
        ])
        self.nodes[silo] = proc
        return proc

    def _flwr(self, args: list[str], what: str, timeout: float = 60.0
              ) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(_tools() / "flwr"), *args], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise DeploymentError(f"could not {what}: {_last_lines(proc.stdout + proc.stderr)}")
        return proc

    # ---- the run -----------------------------------------------------------------------------

    def submit(self, run_config: Mapping[str, object], run_dir: Path,
               on_line: Callable[[str], None] | None = None) -> None:
        """`flwr run` the app with `run_config`, streaming its log to `deploy/run.log`; returns
        when the run has ended. Raises DeploymentError with the authority's reason when the run
        did not produce authority.json."""
        (run_dir / FAILURE_FILE).unlink(missing_ok=True)
        config_file = self.logs / "run-config.toml"
        write_run_config(config_file, run_config)
        run = self.spawn("run", [
            str(_tools() / "flwr"), "run", str(self.app_dir or project_root()), FEDERATION,
            "--run-config", str(config_file), "--stream",
        ])
        seen = 0
        while run.alive():
            self.watch()
            seen = _follow(run.log_path, seen, on_line)
            if not self.link.alive():
                break  # the authority's side is gone; the run cannot finish
            for silo, node in list(self.nodes.items()):
                if not node.alive():
                    log.warning("the %s SuperNode exited (code %s)", silo, node.popen.returncode)
                    del self.nodes[silo]
            time.sleep(0.2)
        _follow(run.log_path, seen, on_line)
        if (run_dir / "authority.json").exists():
            return
        failure = run_dir / FAILURE_FILE
        if failure.exists():
            reason = json.loads(failure.read_text())
            raise DeploymentError(f"the authority stopped: {reason['message']}")
        if not self.link.alive():
            raise DeploymentError(
                f"the SuperLink stopped during the run (exit code {self.link.popen.returncode})")
        raise DeploymentError(
            "the run ended without results (the authority's process was stopped?): "
            f"{_last_lines(run.log_tail(30))}"
        )


@contextmanager
def deployment(silos: tuple[str, ...], parties: Path, keystore: Path | None, logs: Path,
               state: Path, credentials: Path | None = None,
               progress: Callable[[str], None] | None = None) -> Iterator[Deployment]:
    """Bring up a loopback federation; stop every process it started on the way out, whatever
    the way out is (Ctrl-C and SIGTERM included)."""
    logs.mkdir(parents=True, exist_ok=True)
    state.parent.mkdir(parents=True, exist_ok=True)
    ensure_private_dir(state, "the deployment's private directory")
    creds = _credentials(credentials or state / "credentials", silos)
    dep = Deployment(silos, parties, keystore, creds, state / "flwr", logs)
    # Here fedscore plays the silo operators too: it pins the bundle it is about to ship. On
    # separate machines each operator pins the bundle they reviewed (docs/deployment.md).
    dep.app_dir, dep.app_pin = snapshot_app(project_root(), state / "app")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if progress:
            progress("SuperLink (TLS, node authentication)")
        dep.start_superlink()
        for silo in silos:
            dep.register(silo)
        if progress:
            progress("SuperNodes")
        for silo in silos:
            dep.start_supernode(silo)
        yield dep
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            dep.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)


def _credentials(root: Path, silos: tuple[str, ...]) -> Credentials:
    """Credentials in `root`, made on first use (loopback); a partial set is refused."""
    creds = Credentials(root)
    if not creds.ca_cert.exists():
        write_credentials(root, [HOST, "localhost"], silos)
    try:
        creds.check(silos)
    except CredentialError as exc:
        raise DeploymentError(str(exc)) from None
    return creds


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19]) if fields[0] != "Z" else None


def process_tree(roots: list[int]) -> set[tuple[int, int]]:
    """(pid, start time) of `roots` and all their living descendants."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat[stat.rfind(")") + 2:].split()[1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out: set[tuple[int, int]] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        start = _start_time(pid)
        if start is not None:
            out.add((pid, start))
        todo.extend(children.get(pid, []))
    return out


def marked_processes(home: Path) -> set[tuple[int, int]]:
    """(pid, start time) of every living process whose environment has FLWR_HOME=`home`: all
    descendants of what we started inherit it, and the directory is private to this run."""
    marker = f"FLWR_HOME={home}\0".encode()
    out: set[tuple[int, int]] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes():
                    start = _start_time(int(entry.name))
                    if start is not None:
                        out.add((int(entry.name), start))
            except OSError:
                continue
    return out


def _same_process(target: tuple[int, int]) -> bool:
    return _start_time(target[0]) == target[1]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_for_tls(address: str, ca: Path, proc: Process) -> None:
    """Until the SuperLink answers a TLS handshake that verifies against our CA."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if not proc.alive():
            raise DeploymentError(f"the SuperLink exited at start:\n{proc.log_tail()}")
        try:
            with socket.create_connection((host, int(port)), timeout=1) as raw, \
                    ctx.wrap_socket(raw, server_hostname=host):
                return
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"the SuperLink did not answer on {address} within {START_TIMEOUT:.0f} s"
                ) from None
            time.sleep(0.2)


def _follow(path: Path, offset: int, on_line: Callable[[str], None] | None) -> int:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    end = data.rfind(b"\n") + 1
    if on_line:
        for line in data[:end].decode(errors="replace").splitlines():
            on_line(line)
    return offset + end


def progress_relay(progress: Callable[..., None] | None) -> Callable[[str], None]:
    """Turn the authority's progress lines in the run's log stream back into progress calls."""

    def on_line(line: str) -> None:
        at = line.find(PROGRESS_PREFIX)
        if progress is None or at < 0:
            return
        try:
            info = json.loads(line[at + len(PROGRESS_PREFIX):])
            progress(info.pop("phase"), info.pop("done"), info.pop("total"), **info)
        except (ValueError, KeyError, TypeError):
            log.debug("unreadable progress line: %s", line)

    return on_line


def _last_lines(text: str, lines: int = 8) -> str:
    return "\n".join(line for line in text.strip().splitlines()[-lines:])


def write_run_config(path: Path, run_config: Mapping[str, object]) -> None:
    """The run config `flwr run` reads, readable by its owner only: it carries the token of
    our lock on the run directory (`run-lock`), which lets a process act for the holder."""
    replace_private(path, "".join(f"{k} = {_toml(v)}\n" for k, v in run_config.items())
                    .encode())


def _toml(value: object) -> str:
    """A run-config value as TOML (tuples as the comma lists the config parser reads)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    return json.dumps(str(value))
