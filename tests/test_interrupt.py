"""Ctrl-C: one SIGINT to the process group of a foreground `fedscore run` stops it within 5 s,
ends every process it started, says how to resume it and exits 130 (a sweep: test_sweep.py).
A run or sweep cell stopped before its first round ends starts again when resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from server import checkpoint
from server.ledger import LEDGER_FILE
from simulations.run.deploy import process_tree
from tests.conftest import _cli_env, _engine_env
from tests.ray_head import HEAD
from tests.test_deploy import wait_for

STOP_SECONDS = 5.0  # issue 21: one Ctrl-C stops a run or a sweep within 5 s
# A process told to stop may take a moment to go: a joined cluster ends a job's actors once the
# job ended, and each actor's own exit took up to 7 s on a busy 2-core machine (as
# conftest.processes_using). Anything still there after this was left running.
GRACE_SECONDS = 15.0


@dataclass(frozen=True)
class Stopped:
    """How a command ended after one Ctrl-C."""

    returncode: int
    seconds: float  # from the SIGINT to its exit
    output: str  # stdout and stderr
    started: frozenset[tuple[int, int]]  # (pid, start time) of what it started, seen running
    left: frozenset[tuple[int, int]]  # of those, what still runs after GRACE_SECONDS


def aligned(run_dir: Path) -> bool:
    """The run's alignment is saved (checkpoint/run.npz); the silos align theirs next, and
    no round has ended."""
    return (run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.RUN_FILE).exists()


def training(run_dir: Path) -> bool:
    """The silos took the alignment and training began: the ledger's first lines (label DP)
    are written."""
    return (run_dir / LEDGER_FILE).exists()


def interrupt(*args: str, cwd: Path, when: Callable[[], bool], private_ray: bool = False,
              timeout: float = 300) -> Stopped:
    """Start `fedscore ARGS` as a shell starts a foreground job (its own process group), and
    once `when()` holds send SIGINT to the group, as Ctrl-C does.

    What it started is read from the process tree by PID just before the signal: its own
    descendants (with `private_ray`, Ray's own processes too), and, when it joins the
    session's Ray head, what appeared under the head since it began (its job's workers)."""
    env = _cli_env(cwd) if private_ray else _engine_env(cwd)
    head = [HEAD.proc.pid] if env.get("RAY_ADDRESS") and HEAD.proc is not None else []
    before_head = process_tree(head)
    log = cwd / f"interrupted-{time.monotonic_ns()}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], cwd=cwd,
                                env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        wait_for(lambda: when() or proc.poll() is not None, timeout, "the moment to interrupt")
        assert proc.poll() is None, log.read_text()[-3000:]
        started = process_tree([proc.pid]) | (process_tree(head) - before_head)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Stopped(proc.returncode, seconds, log.read_text(), frozenset(started),
                   frozenset(_still_running(started)))


def _still_running(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        alive = {(pid, start) for pid, start in procs if (pid, start) in process_tree([pid])}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def assert_stopped_cleanly(stopped: Stopped) -> None:
    assert stopped.returncode == 130, stopped.output[-3000:]
    assert stopped.seconds < STOP_SECONDS, stopped.output[-3000:]
    assert not stopped.left, stopped.output[-3000:]
    assert "Traceback" not in stopped.output, stopped.output[-3000:]


@pytest.mark.slow
def test_one_ctrl_c_stops_a_run_and_everything_it_started(tmp_path: Path):
    run_dir = tmp_path / "run"
    stopped = interrupt("run", "--out", str(run_dir), "--users", "2000",
                        "--set", "train.epochs=3", "--set", "privacy.guardrails=warn",
                        cwd=tmp_path, when=lambda: training(run_dir), private_ray=True)
    assert_stopped_cleanly(stopped)
    assert len(stopped.started) > 3  # the run and its Ray (GCS, raylet, workers)
    assert f"fedscore run --resume {run_dir}" in stopped.output
    assert not (run_dir / "metrics.json").exists()


# ---- without the engine --------------------------------------------------------------------


def test_a_run_stopped_before_its_first_round_starts_again_when_resumed(tmp_path, monkeypatch):
    """`fedscore run --resume` of a run interrupted before a round ended (no checkpoint of
    the training state, only the alignment) runs it afresh instead of failing."""
    from simulations.run import experiment
    from simulations.run.config import make_config
    from simulations.run.rundir import open_run

    cfg = make_config({}, 2000, 0)
    out, parties = tmp_path / "run", tmp_path / "run.parties"
    open_run(cfg, out, parties, resume=False)
    (out / checkpoint.CHECKPOINT_DIR).mkdir()
    (out / checkpoint.CHECKPOINT_DIR / checkpoint.RUN_FILE).write_bytes(b"alignment")
    asked = []
    monkeypatch.setattr(experiment, "_run_vertical",
                        lambda cfg, out_dir, parties_dir, progress, resume, *rest:
                        asked.append(resume) or {})
    experiment.run_experiment(cfg, out, parties, resume=True)
    assert asked == [False]

    checkpoint.path(out).write_bytes(b"a round's state")  # a round ended: it resumes
    experiment.run_experiment(cfg, out, parties, resume=True)
    assert asked == [False, True]


def test_a_sweep_cell_without_a_finished_round_is_set_aside(tmp_path: Path):
    from simulations.run.grid import Cell
    from simulations.run.sweep import UNFINISHED_DIR, cell_dir, set_aside_unfinished

    cell = Cell((("privacy.epsilon", "1"),), 0)
    directory = cell_dir(tmp_path, cell)
    (directory / checkpoint.CHECKPOINT_DIR).mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / checkpoint.CHECKPOINT_DIR / checkpoint.RUN_FILE).write_bytes(b"alignment")
    assert set_aside_unfinished(tmp_path, cell) is False  # it starts again
    assert not directory.exists()
    assert (tmp_path / UNFINISHED_DIR / f"{cell.name}-1" / "config.json").exists()

    (directory / checkpoint.CHECKPOINT_DIR).mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    checkpoint.path(directory).write_bytes(b"a round's state")
    assert set_aside_unfinished(tmp_path, cell) is True  # it resumes
    assert directory.exists()


def test_a_sweep_with_a_failed_cell_exits_non_zero(tmp_path: Path, monkeypatch):
    from simulations.cli import main as cli
    from simulations.cli import sweep as sweep_cli
    from simulations.run import sweep

    def failing(out: Path, spec, on_cell=None, progress=None) -> pd.DataFrame:
        table = pd.DataFrame([sweep.cell_row(out, spec, spec.cells()[0], "failed", "boom"),
                              {"epsilon": 1.0, "seed": 1, "run": "x", "status": "done"}])
        sweep.summarise(table).to_csv(out / sweep.SUMMARY_FILE, index=False)
        return table

    monkeypatch.setattr(sweep_cli, "run_sweep", failing)  # where the command looks it up
    (tmp_path / "s").mkdir()
    code = cli.main(["sweep", "--out", str(tmp_path / "s"), "--users", "2000",
                     "--epsilons", "1", "--seeds", "0,1"])
    assert code == 1


def test_an_interrupted_command_exits_without_the_interpreters_teardown(monkeypatch):
    """After Ctrl-C the `fedscore` process ends once its exit handlers ran and its output is
    flushed: tearing down torch's, Ray's and pandas' modules took 1.5-2 s of the 5 s on a busy
    2-core machine. A command that did not stop on Ctrl-C, or one with a thread still at work,
    ends as Python ends it."""
    import atexit
    import threading

    from simulations.cli import main as cli

    steps: list[str] = []

    class Exited(BaseException):
        pass

    def exit_now(code: int) -> None:
        steps.append(f"exit {code}")
        raise Exited

    monkeypatch.setattr(cli.os, "_exit", exit_now)
    monkeypatch.setattr(cli.gc, "freeze", lambda: None)  # the test process's objects stay
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: steps.append("exit handlers"))
    monkeypatch.setattr(cli, "main", lambda: 130)
    with pytest.raises(Exited):
        cli.entry()
    assert steps == ["exit handlers", "exit 130"]

    steps.clear()
    monkeypatch.setattr(cli, "main", lambda: 0)
    assert cli.entry() == 0  # a finished command: Python's own exit
    busy = threading.Event()
    worker = threading.Thread(target=busy.wait, daemon=False)  # writing its last file, say
    worker.start()
    try:
        monkeypatch.setattr(cli, "main", lambda: 130)
        assert cli.entry() == 130  # Python's exit waits for it, as before
    finally:
        busy.set()
        worker.join()
    assert steps == []
