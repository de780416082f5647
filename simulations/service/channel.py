"""The caller's side of `fedscore serve`: where a served run listens, and one request to it.

`score`, `dispute` and `drift` ask a served run first (no engine start) and open a session of
their own when nobody serves it; `fedscore serve` (serve.py) is the other side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path

from simulations.run.engine import private_engine_home
from simulations.run.errors import USER_ERRORS

log = logging.getLogger(__name__)

SERVE_FILE = "serve.json"
MAX_REQUEST = 1 << 16


def socket_path(run_dir: Path) -> Path:
    """Under the private engine home: a socket path must stay under ~107 bytes."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return private_engine_home() / f"serve-{digest}.sock"


def request(run_dir: Path, payload: dict, timeout: float = 120.0) -> dict | None:
    """The served run's answer to `payload`, or None when nobody serves `run_dir`."""
    info = run_dir / SERVE_FILE
    if not info.exists():
        return None
    path = Path(json.loads(info.read_text())["socket"])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            # A server killed outright (Ray's SIGTERM handler exits at once) leaves its file.
            log.info("%s names a server that is gone; scoring without it", info)
            info.unlink(missing_ok=True)
            return None
        sock.sendall(json.dumps(payload).encode() + b"\n")
        answer = json.loads(read_line(sock))
    if "error" in answer:
        kind = next((e for e in USER_ERRORS if e.__name__ == answer["error"]), RuntimeError)
        raise kind(answer["message"])
    answer["served"] = True
    return answer


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection without an answer")
        data += chunk
        if len(data) > MAX_REQUEST * 64:
            raise ConnectionError("the answer is too long")
    return data
