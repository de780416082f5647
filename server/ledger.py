"""The privacy ledger: `ledger.jsonl` in the run directory, append-only.

One JSON object per line, run-length encoded like Opacus's accountant history: a new line when
a parameter changes or a round ends. Each line carries the cumulative epsilon of that party's
budget after its steps, as its own accountant computed it, so anyone can re-check every epsilon
with an independent accountant (`fedscore ledger verify RUN_DIR`).

Each kind of line is a typed record (server/ledger_lines.py) that writes the JSON object and
reads it back, and knows its mechanism as a dp-accounting event.

Every line carries `seq`, its position in the ledger (0, 1, 2, ...), and no step is ever
recorded twice: an entry equal to one already in the ledger (everything but `seq` and the
epsilon, which an accountant may compute at another precision) is refused. Two resumed runs on
one directory once appended the same rounds twice (an epsilon above its target); the run lock
(server/run_lock.py) stops the second run, and this check stops any other path to a duplicate.
Appends hold an exclusive `flock` on the file and re-read it when it changed, so even writers in
two processes cannot both append the same step.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Protocol

from crypto.private_files import open_append

LEDGER_FILE = "ledger.jsonl"
SEQ = "seq"
# Not part of what makes a step the same step: its position, and the epsilon (intermediate
# lines carry a default-precision bound, final ones a precise one).
_NOT_IDENTITY = (SEQ, "epsilon")

log = logging.getLogger(__name__)


class LedgerError(ValueError):
    """A ledger that is not in the expected format."""


class DuplicateStepError(LedgerError):
    """An entry the ledger already holds: appending it would count a step twice."""


def step_key(entry: dict) -> str:
    """What identifies a ledger entry as one step (or one release) of one party's budget."""
    return json.dumps({k: v for k, v in entry.items() if k not in _NOT_IDENTITY},
                      sort_keys=True, allow_nan=False)


def duplicates(entries: list[dict]) -> list[tuple[int, int]]:
    """(earlier index, later index) of every entry that repeats an earlier one."""
    seen: dict[str, int] = {}
    out = []
    for i, e in enumerate(entries):
        key = step_key(e)
        if key in seen:
            out.append((seen[key], i))
        else:
            seen[key] = i
    return out


class Line(Protocol):
    """A ledger line (server/ledger_lines.py): the JSON object it is written as."""

    def to_json(self) -> dict[str, object]: ...


class Ledger:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LEDGER_FILE
        # What the file held when last read: its size, the keys of its entries, its length.
        self._size = -1
        self._keys: set[str] = set()
        self._count = 0

    def append(self, line: Line) -> int:
        """Append one line; returns its sequence number. Refuses a step already recorded."""
        entry = line.to_json()  # without `seq`: the ledger numbers its lines, callers do not
        key = step_key(entry)
        # Public (0644): the ledger is what the run publishes about its privacy spend. Never
        # through a planted link, and refused when others could write it.
        with open_append(self.path, "privacy ledger", public=True) as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
            self._refresh(fh)
            if key in self._keys:
                # No identifier here: a ledger line names parties and rounds, never people.
                raise DuplicateStepError(
                    f"{self.path}: party {entry['party']!r}, budget {entry['budget']!r}, round "
                    f"{entry['round']} is already recorded; refusing to count it twice (is "
                    "another process writing this run? `fedscore ledger verify` checks the "
                    "ledger)")
            seq = self._count
            text = json.dumps({SEQ: seq, **entry}, sort_keys=False, allow_nan=False) + "\n"
            # Append and fsync line by line: the ledger is the record a resumed run trusts.
            fh.seek(0, os.SEEK_END)
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            self._size = fh.tell()
            self._keys.add(key)
            self._count += 1
        return seq

    def _refresh(self, fh) -> None:
        """Re-read the entries when the file is not what this writer last saw (a truncation on
        resume, another writer)."""
        size = fh.seek(0, os.SEEK_END)
        if size == self._size:
            return
        fh.seek(0)
        entries = _parse(fh.read().decode("utf-8"), self.path)
        self._keys = {step_key(e) for e in entries}
        self._count = len(entries)
        self._size = size

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Drop lines written after a checkpoint (their steps are replayed on resume)."""
        if self.path.exists() and self.path.stat().st_size > offset:
            with open(self.path, "r+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.truncate(offset)
        self._size = -1  # re-read before the next append


def read(path: Path) -> list[dict]:
    if path.is_dir():
        path = path / LEDGER_FILE
    if not path.exists():
        raise LedgerError(f"no ledger at {path}; runs with differential privacy write one")
    return _parse(path.read_text(), path)


def _parse(text: str, path: Path) -> list[dict]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{path}:{number} is not JSON ({exc.msg})") from None
    return entries
