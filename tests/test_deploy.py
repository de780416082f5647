"""The deployment engine on loopback: TLS, SuperNode authentication, the same results as the
simulation, and no process left behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from crypto.tls import make_node_key, write_credentials
from simulations.deploy import Deployment, process_tree
from tests import background
from tests.conftest import processes_using, run_cli

pytestmark = pytest.mark.slow
# Every message under the deployment engine starts a process: few round trips keep it quick.
ARGS = ("--users", "2000", "--seed", "4", "--set", "train.epochs=1",
        "--set", "train.chunk_warmup=false")
# Mostly waiting on the SuperNodes' 3 s polls, so it runs beside the rest of the suite.
background.register("deployed", lambda work: [("deploy", "--out", str(work / "deployed"), *ARGS)])


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_unregistered_supernode_is_refused(tmp_path: Path):
    creds = write_credentials(tmp_path / "creds", ["127.0.0.1", "localhost"], ["payments"])
    rogue_private, _ = make_node_key()
    rogue_key = tmp_path / "rogue.key"
    rogue_key.write_bytes(rogue_private)
    rogue_key.chmod(0o600)
    (tmp_path / "logs").mkdir()
    dep = Deployment(("payments",), tmp_path / "parties", None, creds, tmp_path / "flwr",
                     tmp_path / "logs")
    try:
        dep.start_superlink()
        dep.register("payments")
        member = dep.start_supernode("payments")
        creds.node_key("rogue").write_bytes(rogue_private)  # same layout, never registered
        creds.node_key("rogue").chmod(0o600)
        rogue = dep.start_supernode("rogue")
        wait_for(lambda: not rogue.alive(), 60, "the unregistered SuperNode to be refused")
        assert rogue.popen.returncode != 0
        assert "Failed to activate SuperNode" in rogue.log_tail(40)
        wait_for(lambda: "SuperNode ID" in member.log_path.read_text(), 60,
                 "the registered SuperNode to join")
        assert member.alive()
        assert "https://" in dep.link.log_path.read_text()  # the SuperLink serves TLS only
    finally:
        started = [p.pid for p in dep.processes]
        dep.stop_all()
    assert process_tree(started) == set()
    assert processes_using(tmp_path / "flwr") == []


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, background_runs) -> tuple[Path, Path]:
    """The deployed run, and the same run in the simulation engine on the SAME parties and
    keystores: every DP draw comes from the parties' secrets, so only the same keystores can
    give the same run."""
    work = tmp_path_factory.mktemp("deploy")
    (proc,), background_work = background_runs("deployed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deployed = background_work / "deployed"
    parties = json.loads((deployed / "run.json").read_text())["parties"]
    sim = run_cli("run", "--out", str(work / "simulated"), "--parties", parties, *ARGS, cwd=work)
    assert sim.returncode == 0, sim.stderr[-3000:]
    return deployed, work / "simulated"


def test_deployed_run_matches_the_simulation(deployed):
    dep, sim = (json.loads((d / "metrics.json").read_text()) for d in deployed)
    assert dep["auc"] == pytest.approx(sim["auc"], abs=0.005)
    assert dep["epsilon"] == sim["epsilon"]
    assert dep["training_steps"] == sim["training_steps"]
    assert dep["people"] == sim["people"]
    run = json.loads((deployed[0] / "run.json").read_text())
    assert run["engine"] == "deployment"


def test_deployed_run_leaves_no_process_and_no_key_in_the_run(deployed):
    run_dir = deployed[0]
    started = json.loads((run_dir / "deploy" / "processes.json").read_text())
    assert {"superlink", "supernode-payments", "supernode-social", "supernode-device"} <= \
        set(started)
    assert process_tree(list(started.values())) == set()
    parties = Path(json.loads((run_dir / "run.json").read_text())["parties"])
    state = parties.with_name(parties.name + ".deploy")
    assert processes_using(state / "flwr") == []
    # Private keys live beside the parties (0600), never in the run directory.
    assert (state / "credentials" / "nodes" / "payments.key").stat().st_mode & 0o077 == 0
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and
              b"PRIVATE KEY" in p.read_bytes()]
    assert leaked == []
    assert os.path.getsize(run_dir / "deploy" / "superlink.log") > 0
