"""Faults under the deployment engine: a silo's SuperNode killed mid-run, and the authority's
SuperLink killed mid-run. Each run stops with a clear message and a checkpoint; `fedscore run
--resume` finishes it with the same epsilon as an uninterrupted run and an AUC within 0.005.

These take minutes (every message under Flower 1.42's deployment engine starts a process), so
they run on demand: `pytest -m faults`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server import checkpoint
from simulations.run.deploy import process_tree
from tests.conftest import ENGINE_ENV, processes_using, run_cli
from tests.test_deploy import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]  # minutes: never in the fast loop
ARGS = ("--users", "2000", "--seed", "4", "--set", "train.epochs=2",
        "--set", "train.chunk_warmup=false", "--set", "train.chunk_batches=2",
        "--set", "reply_timeout=30", "--set", "retries=1",
        # Two DP steps cannot learn (server/privacy.py guardrails): the faults are the point.
        "--set", "privacy.guardrails=warn")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same run without faults (the simulation gives the deployment's results exactly)."""
    work = tmp_path_factory.mktemp("whole")
    proc = run_cli("run", "--out", str(work / "run"), *ARGS, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "run" / "metrics.json").read_text())


def _deploy_and_kill(work: Path, victim: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Start `fedscore deploy`, SIGKILL `victim` (and everything below it) once the first
    round is checkpointed, and wait for the run to stop."""
    run_dir = work / "run"
    env = {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(work / ".flwr"), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "deploy", "--out",
                             str(run_dir), *ARGS], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: checkpoint.path(run_dir).exists() or proc.poll() is not None, 400,
                 "the first round's checkpoint")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        pid = json.loads((run_dir / "deploy" / "processes.json").read_text())[victim]
        for target, _ in process_tree([pid]):
            os.kill(target, signal.SIGKILL)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run_dir, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _resume_and_check(run_dir: Path, work: Path, uninterrupted: dict) -> None:
    parties = Path(json.loads((run_dir / "run.json").read_text())["parties"])
    assert processes_using(parties.with_name(parties.name + ".deploy") / "flwr") == []
    assert checkpoint.path(run_dir).exists()
    resumed = run_cli("run", "--resume", str(run_dir), cwd=work, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / "authority.json").read_text())["resumed"] is True
    assert metrics["epsilon"] == uninterrupted["epsilon"]
    assert metrics["training_steps"] == uninterrupted["training_steps"]
    assert metrics["auc"] == pytest.approx(uninterrupted["auc"], abs=0.005)
    verify = run_cli("ledger", "verify", str(run_dir), cwd=work)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert processes_using(parties.with_name(parties.name + ".deploy") / "flwr") == []


def test_a_killed_silo_stops_the_run_resumably(tmp_path: Path, uninterrupted: dict):
    run_dir, stopped = _deploy_and_kill(tmp_path, "supernode-payments")
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "payments stopped answering" in stopped.stderr
    assert "retry 1 of 1" in (run_dir / "deploy" / "run.log").read_text()
    assert f"fedscore run --resume {run_dir}" in stopped.stderr
    _resume_and_check(run_dir, tmp_path, uninterrupted)


def test_a_killed_authority_stops_the_run_resumably(tmp_path: Path, uninterrupted: dict):
    run_dir, stopped = _deploy_and_kill(tmp_path, "superlink")
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "SuperLink stopped during the run" in stopped.stderr
    assert f"fedscore run --resume {run_dir}" in stopped.stderr
    _resume_and_check(run_dir, tmp_path, uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_deploy_stops_every_process_it_started(tmp_path: Path, sig: int):
    run_dir = tmp_path / "run"
    env = {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(tmp_path / ".flwr")}
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "deploy", "--out",
                             str(run_dir), *ARGS], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (run_dir / "deploy" / "run.log").exists() or proc.poll() is not None,
                 300, "the run to be submitted")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    started = json.loads((run_dir / "deploy" / "processes.json").read_text())
    assert process_tree(list(started.values())) == set()
    parties = Path(json.loads((run_dir / "run.json").read_text())["parties"])
    assert processes_using(parties.with_name(parties.name + ".deploy") / "flwr") == []
