"""One writer per run directory: an exclusive `flock` on `<run>/.lock`, held for a whole command.

Why: two `fedscore run --resume` on one directory both replayed rounds from the same checkpoint
and appended them to the same ledger (a round recorded twice, an epsilon above its target).
Every command that writes into a run directory (run, resume, the `flwr run` ServerApp, serve,
dispute, drift) claims it here first; a second claimant is refused at once, with the holder's
PID and what to do, instead of waiting or racing.

The lock is the kernel's: it is released when the holder exits, however it exits (a killed run
leaves a `.lock` file behind, but no lock). The file records who holds it (PID, command, a
random token) for the refusal message, and so that a process the holder launched on purpose (the
deployment engine's ServerApp, which writes into the run directory the CLI has claimed) can
prove it acts for the holder: it is handed the token, and joins instead of claiming.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
SERVE = "fedscore serve"  # its holder answers score/dispute/drift requests under its lock

# Locks this process holds, by resolved directory: a command that claims a directory and then
# calls code that claims it again (a sweep's cell, a resumed run) re-enters instead of
# refusing itself (flock would refuse a second open file description even in one process).
_held: dict[Path, RunLock] = {}
_held_guard = threading.Lock()


class RunLockedError(FileExistsError):
    """Another process holds the run directory."""


class RunLock:
    """The claim on one run directory; a context manager. `purpose` names the command."""

    def __init__(self, run_dir: Path, purpose: str, join_token: str | None = None) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.purpose = purpose
        self.join_token = join_token
        self.token = ""
        self._fd: int | None = None
        self._outer: RunLock | None = None
        self._depth = 0

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    def acquire(self) -> RunLock:
        with _held_guard:
            held = _held.get(self.run_dir)
            if held is not None:  # this process holds it already: re-enter
                held._depth += 1
                self._outer, self.token = held, held.token
                return self
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if self.join_token and holder.get("token") == self.join_token:
                    # Launched by the holder to write for it (the deployment engine's
                    # ServerApp): the holder's lock covers us.
                    log.info("run directory %s: acting for its holder (PID %s)",
                             self.run_dir.name, holder.get("pid"))
                    self.token = self.join_token
                    return self
                raise RunLockedError(_refusal(self.run_dir, self.purpose, holder)) from None
            self.token = secrets.token_hex(16)
            record = {"pid": os.getpid(), "purpose": self.purpose, "token": self.token,
                      "since": datetime.now(UTC).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self._fd, self._depth = fd, 1
            _held[self.run_dir] = self
            log.info("run directory %s claimed for %s", self.run_dir.name, self.purpose)
            return self

    def release(self) -> None:
        with _held_guard:
            if self._outer is not None:
                self._outer._depth -= 1
                self._outer = None
                return
            if self._fd is None:
                return  # joined for the holder, or never acquired
            self._depth -= 1
            if self._depth > 0:
                return
            _held.pop(self.run_dir, None)
            # Clear the record first: a stale PID in the file would mislead the next refusal.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def claim(run_dir: Path, purpose: str, join_token: str | None = None) -> RunLock:
    """`with claim(run_dir, "run"):` holds the run directory for the block."""
    return RunLock(run_dir, purpose, join_token)


def held_token(run_dir: Path) -> str | None:
    """The token of this process's lock on `run_dir` (for a process it launches), or None."""
    with _held_guard:
        held = _held.get(Path(run_dir).resolve())
        return held.token if held is not None else None


def holder(run_dir: Path) -> dict | None:
    """Who holds `run_dir` now (PID, purpose), or None when nobody does."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            record = _holder(fd)
            record.pop("token", None)  # the token lets a process act for the holder
            return record
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data) if data.strip() else {}
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _refusal(run_dir: Path, purpose: str, holder: dict) -> str:
    pid = holder.get("pid", "unknown")
    what = holder.get("purpose", "another fedscore command")
    since = f" since {holder['since']}" if holder.get("since") else ""
    return (f"{run_dir} is in use: process {pid} ({what}{since}) holds it, so `{purpose}` was "
            f"refused and nothing was changed. Wait for that process to finish (or stop it: "
            f"kill {pid}), then run this command again")
