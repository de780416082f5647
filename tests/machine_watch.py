"""What a command does on the machine while it runs, sampled from /proc: the sockets its
process tree listens on, every command line that holds a phone number, Ray's token, GCS port
and job table. The tests of Ray on loopback with a token (tests/test_security_machine.py) and
the served federation (tests/test_people.py) watch their sessions with it."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simulations.run.deploy import process_tree
from tests.conftest import ENGINE_ENV


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


def check_ray(watch: Watch) -> None:
    """Ray ran and listened on loopback only."""
    print("listening sockets of the run's processes:")
    for pid, proto, addr, port in sorted(watch.sockets):
        print(f"  {watch.names[pid]:<22} pid {pid:<7} {proto:<5} {addr}:{port}")
    assert "gcs_server" in watch.names.values(), "the sampler never saw Ray's GCS"
    assert "raylet" in watch.names.values()
    assert watch.non_loopback() == []
    assert watch.token, "no Ray token in the command's environment"
    assert watch.gcs_port is not None


def probe_gcs(watch: Watch) -> None:
    """GCS refuses a client with no token or a wrong one, and answers one with the token."""
    import grpc

    with pytest.raises(grpc.RpcError) as refused:
        _gcs(watch.gcs_port, None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as wrong:
        _gcs(watch.gcs_port, "0" * 64)
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _gcs(watch.gcs_port, watch.token) >= 0  # answered: the token is what lets one in


def wait(predicate, seconds: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(0.25)


def session_env(cwd: Path) -> dict[str, str]:
    return {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(cwd / ".flwr"), "COLUMNS": "200"}
