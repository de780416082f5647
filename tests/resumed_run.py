"""One run stopped four ways and resumed, shared by the modules that check it.

The leak canary (test_leak_canary.py) needs a run that crashed mid-training and was resumed,
every message captured, verbose logs, nothing encrypted at rest; the run-directory tests
(test_security_rundir.py) need a crashed run resumed while a second resume is refused, and a
run killed as its baselines start, then as its audit starts, each resume finishing from the
first unfinished phase. One run in the background gives all of it:

  0. generate 1,500 people;
  1. train, the authority failing on purpose after round 2 (its checkpoint written first);
  2. `--resume`, stopped as the baselines start; while it holds the run, a second `--resume`
     is started and must be refused naming it;
  3. `--resume`, stopped as the audit starts;
  4. `--resume` to the end.

Before each command, what the previous one left is checked and kept (a copy of the run as the
crash left it, the phases, the federated outputs' digests, the kept baselines), since the next
command changes the run directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import background

USERS = "1500"
# The run draws fresh secrets (no keystore), so its split is a fresh draw: at the default 6 %
# rate a validation split of 1,500 people holds about 12 defaulters, and fewer than five (a
# refused split) came up in CI. At 15 % it holds about 30; fewer than five is a one-in-10^8
# draw.
RATE = ("--set", "population.default_rate=0.15")
RUN_ARGS = ("--users", USERS, "--seed", "11", *RATE, "--set", "train.epochs=2",
            "--set", "train.batch_size=128",
            # Plaintext at rest: the canary must see inside every checkpoint, not ciphertext.
            "--set", "storage.keystore=none")
CRASH_ROUND = 2


def federated_digests(run: Path) -> dict[str, str]:
    """The federated part's outputs, which no resume after it may write again."""
    names = [p.name for p in run.glob("scores.parquet*")] + ["ledger.jsonl", "authority.json"]
    return {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in names}


class _SecondResume:
    """Starts a second `--resume` as soon as the first holds the run, and keeps what it said."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self._work, self._env = work, env
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, _: Path) -> None:
        self._thread.start()

    def _run(self) -> None:
        from server.run_lock import holder

        run, record = self._work / "run", {}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            held = holder(run) or {}
            if held.get("pid"):
                record["holder_pid"] = held["pid"]
                second = subprocess.run(
                    [sys.executable, "-m", "simulations.cli", "run", "--resume", str(run)],
                    cwd=self._work, env=self._env, capture_output=True, text=True, timeout=300,
                    check=False)
                record.update(returncode=second.returncode, stdout=second.stdout,
                              stderr=second.stderr)
                break
            time.sleep(0.1)
        (self._work / "second-resume.json").write_text(json.dumps(record))


def _commands(work: Path) -> list[background.Command]:
    from clients.protocol.capture import CAPTURE_ENV
    from server import run_phases
    from server.authority import FAIL_AFTER_ROUND
    from tests.conftest import _background_env

    run, parties = work / "run", work / "parties"
    capture = {CAPTURE_ENV: str(work / "capture")}

    def crashed_mid_run(work: Path) -> None:
        said = (work / "cli-1.stderr").read_text()
        if f"injected failure after round {CRASH_ROUND}" not in said:
            raise AssertionError(f"the run did not stop after round {CRASH_ROUND}: {said[-2000:]}")
        if not (run / "checkpoint" / "run.npz").exists():
            raise AssertionError("the crashed run left no checkpoint")
        shutil.copytree(run, work / "crashed-copy")

    def stopped_at_baselines(work: Path) -> None:
        (work / "stopped-at-baselines.json").write_text(json.dumps({
            "finished": run_phases.finished(run), "digests": federated_digests(run),
            "metrics_written": (run / "metrics.json").exists()}))

    def stopped_at_audit(work: Path) -> None:
        (work / "stopped-at-audit.json").write_text(json.dumps({
            "finished": run_phases.finished(run),
            "baselines": run_phases.saved(run, "baselines")}))

    second = _SecondResume(work, _background_env(work))

    def before_first_resume(work: Path) -> None:
        crashed_mid_run(work)
        second.start(work)

    resume = ("-v", "run", "--resume", str(run))
    return [
        background.Command(("generate", "--parties", str(parties), "--users", USERS,
                            "--seed", "11", *RATE)),
        background.Command(("-v", "run", "--out", str(run), "--parties", str(parties),
                            *RUN_ARGS),
                           env={**capture, FAIL_AFTER_ROUND: str(CRASH_ROUND)}, expect=2),
        background.Command(resume, env={**capture, run_phases.FAIL_AT_PHASE: "baselines"},
                           expect=2, before=before_first_resume),
        background.Command(resume, env={**capture, run_phases.FAIL_AT_PHASE: "audit"},
                           expect=2, before=stopped_at_baselines),
        background.Command(resume, env=capture, before=stopped_at_audit),
    ]


background.register("resumed_run", _commands)


@pytest.fixture(scope="session")
def resumed_run(background_runs) -> dict:
    """The shared run's paths and what each step said: "work", "run" (finished), "parties",
    "capture" (every message payload), "crashed_copy" (the run directory as the crash left
    it), "procs" (one result per command), "pids" (per command), "second" (the refused second
    resume: holder_pid, returncode, stdout, stderr), "at_baselines" and "at_audit" (what the
    stops left)."""
    procs, work = background_runs("resumed_run")
    said = "\n".join(p.stdout[-2000:] + p.stderr[-3000:] for p in procs)
    assert [p.returncode for p in procs] == [0, 2, 2, 2, 0], said
    second = work / "second-resume.json"
    for _ in range(600):  # the thread writes it once the second resume returns
        if second.exists():
            break
        time.sleep(0.1)
    return {"work": work, "run": work / "run", "parties": work / "parties",
            "capture": work / "capture", "crashed_copy": work / "crashed-copy",
            "procs": procs, "pids": background.pids(work),
            "second": json.loads(second.read_text()),
            "at_baselines": json.loads((work / "stopped-at-baselines.json").read_text()),
            "at_audit": json.loads((work / "stopped-at-audit.json").read_text())}
