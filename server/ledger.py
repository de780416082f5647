"""The privacy ledger: `ledger.jsonl` in the run directory, append-only.

One JSON object per line, run-length encoded like Opacus's accountant history: a new line when
a parameter changes or a round ends. Each line carries the cumulative epsilon of that party's
budget after its steps, as its own accountant computed it, so anyone can re-check every epsilon
with an independent accountant (`fedscore ledger verify RUN_DIR`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

LEDGER_FILE = "ledger.jsonl"
# Every line has these; Gaussian lines add noise_multiplier and sample_rate, randomised
# response lines epsilon_rr.
FIELDS = ("party", "budget", "mechanism", "steps", "round", "epsilon", "delta", "accountant")


class LedgerError(ValueError):
    """A ledger that is not in the expected format."""


class Ledger:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LEDGER_FILE

    def append(self, **entry: object) -> None:
        missing = [f for f in FIELDS if f not in entry]
        if missing:
            raise LedgerError(f"ledger entry lacks {', '.join(missing)}")
        line = json.dumps(entry, sort_keys=False, allow_nan=False) + "\n"
        # Append and fsync line by line: the ledger is the record a resumed run trusts.
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        """Drop lines written after a checkpoint (their steps are replayed on resume)."""
        if self.path.exists() and self.path.stat().st_size > offset:
            with open(self.path, "r+b") as fh:
                fh.truncate(offset)


def read(path: Path) -> list[dict]:
    if path.is_dir():
        path = path / LEDGER_FILE
    if not path.exists():
        raise LedgerError(f"no ledger at {path}; runs with differential privacy write one")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{path}:{number} is not JSON ({exc.msg})") from None
    return entries


def budgets(entries: list[dict]) -> Iterator[tuple[tuple[str, str], list[dict]]]:
    """Entries grouped by (party, budget), in ledger order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in entries:
        groups.setdefault((e["party"], e["budget"]), []).append(e)
    yield from groups.items()
