"""The machine a run happens on (issue 18, item 4): Ray's control plane on loopback with token
authentication, no phone number on any command line, private directories that refuse a hijack,
private writes that refuse a symlink."""

from __future__ import annotations

import ipaddress
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crypto.private_files import (
    PrivateDirError,
    ensure_private_dir,
    replace_private,
    write_private,
)
from simulations.run.deploy import process_tree
from tests.conftest import ENGINE_ENV, run_cli

# ---- private directories and files ------------------------------------------------------------


def test_private_dir_is_made_0700_and_reused(tmp_path: Path):
    made = ensure_private_dir(tmp_path / "home")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert ensure_private_dir(made) == made


def test_private_dir_open_to_others_is_refused(tmp_path: Path):
    planted = tmp_path / "fedscore-x"
    planted.mkdir()
    planted.chmod(0o777)  # what an attacker leaves in /tmp before we first run
    with pytest.raises(PrivateDirError, match="open to other users"):
        ensure_private_dir(planted)
    planted.chmod(0o750)
    with pytest.raises(PrivateDirError, match="mode 750"):
        ensure_private_dir(planted)


def test_private_dir_of_another_user_is_refused(tmp_path: Path, monkeypatch):
    planted = tmp_path / "fedscore-x"
    planted.mkdir(mode=0o700)
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)  # the directory is now someone else's
    with pytest.raises(PrivateDirError, match="belongs to another user"):
        ensure_private_dir(planted)


def test_private_dir_through_a_symlink_is_refused(tmp_path: Path):
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    (tmp_path / "fedscore-x").symlink_to(target)
    with pytest.raises(PrivateDirError, match="symbolic link"):
        ensure_private_dir(tmp_path / "fedscore-x")


@pytest.mark.slow
def test_engine_refuses_a_hijacked_home_in_the_temp_dir(tmp_path: Path):
    """The whole CLI stops with a clear error, before any engine starts."""
    planted = tmp_path / f"fedscore-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    env = {**os.environ, **ENGINE_ENV, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "audit", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "open to other users" in out
    assert "Traceback" not in out
    assert list(planted.iterdir()) == []  # nothing of ours went in


@pytest.mark.parametrize("write", [write_private, replace_private])
def test_private_writes_never_follow_a_symlink(tmp_path: Path, write):
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs")
    (tmp_path / "node.key").symlink_to(victim)
    with pytest.raises(OSError, match=r"Too many levels of symbolic links|File exists"):
        write(tmp_path / "node.key", b"secret")
    assert victim.read_bytes() == b"theirs"


def test_replace_private_leaves_the_file_0600(tmp_path: Path):
    path = tmp_path / "server.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    replace_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# ---- the phone number off the command line ----------------------------------------------------


@pytest.mark.slow
def test_subject_on_the_command_line_is_refused(tmp_path: Path):
    phone = "13812345678"
    proc = run_cli("score", str(tmp_path), "--subject", phone, cwd=tmp_path, engine=False)
    assert proc.returncode == 2
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "--subject PHONE puts the phone number on the command line" in out
    assert "stdin" in out
    assert "--subject-file" in out
    assert phone not in out


@pytest.mark.slow
def test_an_empty_stdin_is_refused(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "score", str(tmp_path)],
                          input="", cwd=tmp_path, env={**os.environ, **ENGINE_ENV},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "no phone number given" in " ".join((proc.stdout + proc.stderr).split())


# ---- Ray on loopback, with token authentication -----------------------------------------------


def _listening_inodes() -> dict[int, tuple[str, str, int]]:
    """inode -> (protocol, address, port) of every listening TCP and bound UDP socket."""
    out: dict[int, tuple[str, str, int]] = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != ("0A" if proto.startswith("tcp") else "07"):  # LISTEN / unconnected
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(fields[9])] = (proto, str(ipaddress.ip_address(words)), int(hex_port, 16))
    return out


def listening_sockets(pids: set[int]) -> set[tuple[int, str, str, int]]:
    """(pid, protocol, address, port) of the sockets `pids` listen on (like `ss -ltnup`)."""
    inodes = _listening_inodes()
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                found.add((pid, *inodes[int(target[8:-1])]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


@dataclass
class Watch:
    """What a sampler saw while a command ran: every listening socket of its process tree,
    every command line on the machine that held the phone, Ray's token and GCS port."""

    root: int
    phone: str
    sockets: set[tuple[int, str, str, int]] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)
    phone_in: set[str] = field(default_factory=set)
    token: str | None = None
    gcs_port: int | None = None
    jobs_seen: int = 0  # most drivers Ray's job table listed at once
    phone_in_jobs: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def digits(self) -> str:
        """The national number: found however the phone was written (+86 or not)."""
        return self.phone.lstrip("+")[-11:]

    def sample(self) -> None:
        pids = {pid for pid, _ in process_tree([self.root])}
        for sock in listening_sockets(pids):
            self.sockets.add(sock)
            self.names.setdefault(sock[0], _comm(sock[0]))
            if self.names[sock[0]] == "gcs_server" and sock[1].startswith("tcp"):
                self.gcs_port = sock[3]
        for pid in pids if self.token is None else ():
            # Ray's processes got the token at exec; the CLI set it after its own start, which
            # /proc/PID/environ (the initial environment) does not show.
            self.token = self.token or _environ(pid).get("RAY_AUTH_TOKEN")
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if self.digits.encode() in cmdline:
                    self.phone_in.add(cmdline.replace(b"\0", b" ").decode(errors="replace"))

    def sample_jobs(self) -> None:
        """Ray's job table (with the token), which keeps each driver's command line."""
        import grpc

        if self.gcs_port is None or self.token is None:
            return
        try:
            jobs = _job_table(self.gcs_port, self.token)
        except grpc.RpcError:  # GCS going down with the command
            return
        self.jobs_seen = max(self.jobs_seen, jobs.count("job_id:"))
        self.phone_in_jobs |= self.digits in jobs

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.sample_jobs()
            time.sleep(0.25)

    def non_loopback(self) -> list[str]:
        return [f"{self.names[pid]} (pid {pid}) on {proto} {addr}:{port}"
                for pid, proto, addr, port in sorted(self.sockets) if not is_loopback(addr)]


def _gcs(port: int, token: str | None) -> int:
    """Nodes GCS reports to a client with `token` (None: no token)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10,
                                    metadata=metadata)
    return len(reply.node_info_list)


def _job_table(port: int, token: str) -> str:
    """Ray's job table as GCS gives it to a client with the token."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gcs_service_pb2_grpc.JobInfoGcsServiceStub(channel)
        reply = stub.GetAllJobInfo(gcs_service_pb2.GetAllJobInfoRequest(), timeout=10,
                                   metadata=[("authorization", f"Bearer {token}")])
    return str(reply)


def _check_ray(watch: Watch) -> None:
    """Ray ran and listened on loopback only."""
    print("listening sockets of the run's processes:")
    for pid, proto, addr, port in sorted(watch.sockets):
        print(f"  {watch.names[pid]:<22} pid {pid:<7} {proto:<5} {addr}:{port}")
    assert "gcs_server" in watch.names.values(), "the sampler never saw Ray's GCS"
    assert "raylet" in watch.names.values()
    assert watch.non_loopback() == []
    assert watch.token, "no Ray token in the command's environment"
    assert watch.gcs_port is not None


def _probe_gcs(watch: Watch) -> None:
    """GCS refuses a client with no token or a wrong one, and answers one with the token."""
    import grpc

    with pytest.raises(grpc.RpcError) as refused:
        _gcs(watch.gcs_port, None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as wrong:
        _gcs(watch.gcs_port, "0" * 64)
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _gcs(watch.gcs_port, watch.token) >= 0  # answered: the token is what lets one in


def _wait(predicate, seconds: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(0.25)


def _env(cwd: Path) -> dict[str, str]:
    return {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(cwd / ".flwr"), "COLUMNS": "200"}


@pytest.mark.slow
def test_score_session_on_loopback_with_token_and_no_phone_on_any_command_line(
        small_run: Path, tmp_path: Path):
    from tests.test_people import _copy_run, _phones

    run = _copy_run(small_run, tmp_path)
    people = _phones(run)
    phone = str(people[people["status"] == "scored"].iloc[0]["phone"])
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "score", str(run)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env(tmp_path))
    watch = Watch(proc.pid, phone)
    sampler = threading.Thread(target=watch.run, daemon=True)
    sampler.start()
    try:
        proc.stdin.write(phone + "\n")
        proc.stdin.close()
        proc.stdin = None  # communicate() below must not touch the closed pipe
        # Ask GCS while the session is up (it closes with the command).
        _wait(lambda: watch.gcs_port is not None and watch.token is not None, 120,
              "Ray GCS", proc)
        _probe_gcs(watch)
        out, err = proc.communicate(timeout=300)
    finally:
        watch.stop.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "score " in out
    _check_ray(watch)
    assert watch.phone_in == set(), "the phone number was on a command line"
    assert watch.jobs_seen >= 1, "the sampler never read Ray's job table"
    assert not watch.phone_in_jobs


@pytest.mark.slow
def test_serve_on_loopback_with_token(small_run: Path, tmp_path: Path):
    from tests.test_people import _copy_run, _phones

    run = _copy_run(small_run, tmp_path)
    people = _phones(run)
    phone = str(people[people["status"] == "scored"].iloc[0]["phone"])
    server = subprocess.Popen([sys.executable, "-m", "simulations.cli", "serve", str(run)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env=_env(tmp_path))
    watch = Watch(server.pid, phone)
    sampler = threading.Thread(target=watch.run, daemon=True)
    sampler.start()
    try:
        _wait(lambda: (run / "serve.json").exists(), 180, "serve.json", server)
        time.sleep(1.0)  # a few samples of the served federation at rest
        _probe_gcs(watch)
        looked = subprocess.run([sys.executable, "-m", "simulations.cli", "score", str(run)],
                                input=phone + "\n", cwd=tmp_path, env=_env(tmp_path),
                                capture_output=True, text=True, timeout=120, check=False)
        assert looked.returncode == 0, looked.stderr
        assert "score " in looked.stdout
    finally:
        watch.stop.set()
        sampler.join()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=90)
    _check_ray(watch)
    assert watch.phone_in == set()
    assert watch.jobs_seen >= 1
    assert not watch.phone_in_jobs
