"""The deployment engine on loopback: TLS, SuperNode authentication, the same results as the
simulation, and no process left behind."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from clients.protocol.schema import federation_silos
from crypto.tls import make_node_key, write_credentials
from simulations.run import app_pin
from simulations.run.deploy import (
    FEDERATION,
    Deployment,
    process_tree,
    project_root,
    snapshot_app,
    write_run_config,
)
from tests import background
from tests.conftest import processes_using, run_cli
from tests.waiting import until

pytestmark = pytest.mark.slow
# Every message under the deployment engine starts a process: few round trips keep it quick.
# One DP step cannot learn (server/privacy.py guardrails): allowed here, the test is about the
# deployment's machinery.
ARGS = ("--users", "2000", "--seed", "4", "--set", "train.epochs=1",
        "--set", "train.chunk_warmup=false", "--set", "privacy.guardrails=warn")
# Mostly waiting on the SuperNodes' 3 s polls, so it runs beside the rest of the suite.
# SuperNodes poll for work every 3 s: the run mostly waits, so it does not queue.
background.register("deployed", lambda work: [("deploy", "--out", str(work / "deployed"), *ARGS)],
                    waits=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    if not until(predicate, timeout, every=0.2):
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# The two refusals below mostly wait for SuperNodes to join (3 s polls): each runs in a
# process of its own beside the suite (background.register_check) and its test awaits it.
def refuses_an_unregistered_supernode(tmp_path: Path) -> None:
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


def refuses_an_app_bundle_it_did_not_pin(tmp_path: Path) -> None:
    """The silos pinned the bundle they reviewed; the SuperLink ships one differing by one
    byte. Each SuperNode refuses it before storing or running it, and stays up."""
    parties = tmp_path / "parties"
    made = run_cli("generate", "--parties", str(parties), "--users", "1000", "--seed", "3",
                   cwd=tmp_path)  # enrolled: the authority's first message needs a roster
    assert made.returncode == 0, made.stderr
    silos = federation_silos(parties)
    creds = write_credentials(tmp_path / "creds", ["127.0.0.1", "localhost"], list(silos))
    (tmp_path / "logs").mkdir()
    app, pin = snapshot_app(project_root(), tmp_path / "app")
    code = app / "clients" / "silo" / "app.py"
    source = code.read_bytes()
    assert source.endswith(b"\n")
    code.write_bytes(source[:-1] + b" ")  # one byte: the authority's edit to the silos' code
    assert app_pin.pin_of(app) != pin
    dep = Deployment(silos, parties, None, creds, tmp_path / "flwr", tmp_path / "logs",
                     app_pin=pin, app_dir=app)
    try:
        dep.start_superlink()
        nodes = []
        for silo in silos:
            dep.register(silo)
            nodes.append(dep.start_supernode(silo))
        for node in nodes:
            wait_for(lambda node=node: "SuperNode ID" in node.log_path.read_text(), 60,
                     "the pinned SuperNodes to join")
        config = tmp_path / "run-config.toml"
        config.write_text(f'data-dir = "{parties}"\nrun-dir = "{tmp_path / "run"}"\n')
        dep.spawn("run", [str(Path(sys.executable).parent / "flwr"), "run", str(app),
                          FEDERATION, "--run-config", str(config)])
        failed = tmp_path / "run" / "authority-failed.json"

        def refusals() -> list[str]:
            return [n.name for n in nodes if "REFUSED an app bundle" in n.log_path.read_text()]

        # The authority loads its table before its first message, which can take a while under
        # load; if it stops before that, say why.
        wait_for(lambda: refusals() or failed.exists(), 300, "a SuperNode to refuse the bundle")
        # The authority can record the refusal (the node's error reply) a moment before the
        # node's own log line is on disk: give the log time to catch up.
        assert until(refusals, 30, every=0.5), \
            (failed.read_text() if failed.exists() else "") + nodes[0].log_tail(20)
        refused = refusals()
        for node in nodes:
            if node.name in refused:  # Flower's refusal path: the bundle is not stored or run
                # Flower logs its verdict after ours (app_pin's wrapper, then _verify_fab):
                # under load the line can come seconds later.
                wait_for(lambda node=node: "FAB verification failed" in
                         node.log_path.read_text(), 60, "Flower's verification failure")
            text = node.log_path.read_text()
            if node.name in refused:
                assert f"pin {pin[:12]}" in text
            assert "matches the pinned one" not in text  # no node ran the tampered bundle
            assert node.alive()
    finally:
        started = [p.pid for p in dep.processes]
        dep.stop_all()
    assert process_tree(started) == set()


background.register_check("unregistered_refused", refuses_an_unregistered_supernode, waits=True)
background.register_check("unpinned_refused", refuses_an_app_bundle_it_did_not_pin, waits=True)


@pytest.fixture
def unregistered_refused() -> None:
    background.passed("unregistered_refused")


@pytest.fixture
def unpinned_refused() -> None:
    background.passed("unpinned_refused")


def test_unregistered_supernode_is_refused(unregistered_refused):
    """A SuperNode whose key was never registered is refused; a registered one joins, over TLS
    only (refuses_an_unregistered_supernode)."""


def test_supernode_refuses_an_app_bundle_it_did_not_pin(unpinned_refused):
    """The silos pinned the bundle they reviewed; the SuperLink ships one differing by one
    byte: each SuperNode refuses it before storing or running it, and stays up
    (refuses_an_app_bundle_it_did_not_pin)."""


def test_the_run_config_with_the_lock_token_is_private(tmp_path: Path):
    path = tmp_path / "run-config.toml"
    path.write_text("old")
    os.chmod(path, 0o644)  # a resumed deployment rewrites last time's file
    write_run_config(path, {"run-lock": "abc123", "train.epochs": 3, "model.hidden": (32, 16)})
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == 'run-lock = "abc123"\ntrain.epochs = 3\nmodel.hidden = "32,16"\n'


def test_app_pin_is_reproducible_and_checked(tmp_path: Path):
    app, pin = snapshot_app(project_root(), tmp_path / "app")
    assert app_pin.pin_of(app) == pin  # `flwr run` on the snapshot ships the pinned bundle
    assert app_pin.checked_pin(pin.upper()) == pin
    with pytest.raises(app_pin.AppPinError):
        app_pin.checked_pin(pin[:-1])


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
    # Every SuperNode ran only the bundle it pinned (simulations/run/app_pin.py).
    for silo in ("payments", "social", "device"):
        log_text = (run_dir / "deploy" / f"supernode-{silo}.log").read_text()
        assert "the app bundle matches the pinned one" in log_text
        assert "REFUSED" not in log_text
