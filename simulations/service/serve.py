"""`fedscore serve RUN_DIR`: keep a run's federation up and answer people's requests.

Starting Flower's simulation engine costs about 10 s, most of a one-off `fedscore score` or
`fedscore dispute`. A served run keeps the session open (silos hold their restored models) and
takes requests over a Unix socket readable by its owner only; `score` and `dispute` use it when
it is up and open a session of their own when it is not. Requests carry the run's row position
and keyed subject reference, never a phone number: the command line resolves those first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server import rescore
from server.federation import Federation
from server.rescore import Scorer
from server.run_lock import SERVE, claim
from simulations.run.engine import interrupted
from simulations.service.channel import SERVE_FILE, read_line, socket_path
from simulations.service.drift_run import drift_report
from simulations.service.session import (
    FinishedRun,
    Progress,
    open_finished,
    run_session,
    score_person,
    settle,
)

log = logging.getLogger(__name__)

def serve(run_dir: Path, progress: Progress | None = None,
          on_ready: Callable[[Path], None] | None = None,
          stop: threading.Event | None = None) -> int:
    """Serve requests until `stop` is set or a `stop` request arrives; returns how many."""
    run = open_finished(run_dir)
    stop = stop or threading.Event()

    served: list[int] = []

    def work(fed: Federation, scorer: Scorer) -> int:
        served.append(_loop(run, fed, scorer, stop, on_ready))
        return served[0]

    # The server writes disputes and drift reports into the run directory for its callers:
    # it holds the directory while it serves (server/run_lock.py).
    with claim(run.run_dir, SERVE):
        try:
            return run_session(run, work, progress)
        except KeyboardInterrupt:
            if served:  # Ctrl-C ended the serving loop: a stop, as a `stop` request is
                return served[0]
            raise


def _loop(run: FinishedRun, fed: Federation, scorer: Scorer, stop: threading.Event,
          on_ready: Callable[[Path], None] | None) -> int:
    # The silos' first score loads torch and their tables in every engine worker (seconds);
    # pay that before announcing the server, so the first person is as fast as the next.
    for _ in range(2):
        rescore.score(fed, scorer, np.zeros(1, dtype=np.int64))
    path = socket_path(run.run_dir)
    path.unlink(missing_ok=True)
    served = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        old = os.umask(0o177)  # the socket is born 0600: only its owner may connect
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(8)
        server.settimeout(0.2)
        info = run.run_dir / SERVE_FILE
        info.write_text(json.dumps({"socket": str(path), "pid": os.getpid()}) + "\n")
        if on_ready:
            on_ready(path)
        log.info("serving %s on %s", run.run_dir, path)
        try:
            # Ctrl-C reaches the engine (run_federation), which stops the app at its next
            # message; this loop sends none while it waits, so it looks.
            while not (stop.is_set() or interrupted(fed.grid)):
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    served += 1
                    _answer(conn, run, fed, scorer, stop)
        finally:
            with contextlib.suppress(FileNotFoundError):
                info.unlink()
            path.unlink(missing_ok=True)
    return served


def _answer(conn: socket.socket, run: FinishedRun, fed: Federation, scorer: Scorer,
            stop: threading.Event) -> None:
    conn.settimeout(30)
    try:
        req = json.loads(read_line(conn))
        op = req.pop("op", None)
        if op == "score":
            answer = score_person(fed, scorer, int(req["position"]), str(req["ref"]),
                                  int(req.get("repeat", 1)))
        elif op == "dispute":
            answer = settle(run, fed, scorer, **req)
        elif op == "drift":
            answer = drift_report(run, fed, scorer, str(req["cohort"]), bool(req["made"]))
        elif op == "stop":
            stop.set()
            answer = {"stopped": True}
        else:
            answer = {"error": "ValueError", "message": f"unknown request {op!r}"}
    except Exception as exc:  # the caller gets the error; the server goes on
        log.warning("request failed: %s: %s", type(exc).__name__, exc)
        answer = {"error": type(exc).__name__, "message": str(exc)}
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(answer, default=str).encode() + b"\n")
