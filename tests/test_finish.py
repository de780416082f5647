"""`fedscore finish` on what it must refuse: each refusal names the fix and writes nothing.

Completing a real `flwr run .` output, and reporting it, is tested on the one such run the
suite makes (tests/test_flower_app.py); these directories are synthetic, no engine starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crypto.at_rest import Keystore
from server.config import AuthorityConfig
from server.config_keys import to_flat
from server.server_app import FAILURE_FILE
from simulations.data.population import PopulationConfig
from simulations.data.real_data import SOURCE_FILE
from tests.conftest import run_cli


def _flwr_output(tmp_path: Path, **authority: object) -> tuple[Path, Path]:
    """What `flwr run .` leaves in out-dir/<run id> (authority.json), beside generated parties
    (population.json) whose keystore is absent."""
    parties = tmp_path / "parties"
    (parties / "simulation").mkdir(parents=True)
    (parties / "simulation" / "population.json").write_text(
        PopulationConfig(users=2000).to_json())
    run_dir = tmp_path / "out" / "7"
    run_dir.mkdir(parents=True)
    record = {"config": to_flat(AuthorityConfig()), "model": {"run_key": "r"},
              "seconds": {"train": 1.0}, **authority}
    (run_dir / "authority.json").write_text(json.dumps(record))
    return run_dir, parties


def _finish(run_dir: Path, parties: Path, *extra: str) -> tuple[int, str]:
    proc = run_cli("finish", str(run_dir), "--parties", str(parties), *extra,
                   cwd=run_dir.parent, engine=False)
    return proc.returncode, " ".join(proc.stderr.split())


def _unchanged(run_dir: Path) -> bool:
    """Nothing but the federation's own file (and the lock's, which records no result)."""
    return {p.name for p in run_dir.iterdir()} <= {"authority.json", ".lock"}


def test_report_on_a_flwr_output_names_the_finish_command(tmp_path: Path):
    run_dir, _ = _flwr_output(tmp_path)
    proc = run_cli("report", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"complete it with `fedscore finish {run_dir} --parties" in " ".join(
        proc.stderr.split())


def test_parties_without_the_runs_keystore_are_refused_and_no_keystore_is_made(
        tmp_path: Path):
    run_dir, parties = _flwr_output(tmp_path)
    code, err = _finish(run_dir, parties)
    assert code == 2
    assert f"no keystore at {parties}.keys" in err
    assert "pass the data-dir the run" in err
    assert not parties.with_name("parties.keys").exists()  # storage.keystore=auto: not created
    assert _unchanged(run_dir)


def test_a_keystore_without_the_run_is_refused(tmp_path: Path):
    run_dir, parties = _flwr_output(tmp_path)
    Keystore.init(parties.with_name("parties.keys"))
    code, err = _finish(run_dir, parties)
    assert code == 2
    assert "has no record of a run in" in err
    assert "--parties" in err
    assert _unchanged(run_dir)


@pytest.mark.parametrize(("case", "message"), [
    ("no authority.json", "holds no authority.json: the federation has not finished"),
    ("failed", "failed (FederationError: a silo left); nothing to finish"),
    ("finished", "finished already (metrics.json exists); nothing to do: fedscore report"),
    ("no config", "records no run configuration"),
    ("--data", "holds a generated population"),
    ("real data", "say which with --data"),
    ("no parties", "holds no party tables of a run"),
])
def test_what_cannot_be_finished_is_refused_with_the_fix(tmp_path: Path, case: str,
                                                          message: str):
    run_dir, parties = _flwr_output(tmp_path)
    extra: tuple[str, ...] = ()
    if case == "no authority.json":
        (run_dir / "authority.json").unlink()
    elif case == "failed":
        (run_dir / FAILURE_FILE).write_text(
            json.dumps({"error": "FederationError", "message": "a silo left"}))
    elif case == "finished":
        (run_dir / "metrics.json").write_text("{}")
    elif case == "no config":
        (run_dir / "authority.json").write_text(json.dumps({"model": {"run_key": "r"}}))
    elif case == "--data":
        extra = ("--data", "uci")
    elif case == "real data":
        (parties / "simulation" / "population.json").unlink()
        (parties / SOURCE_FILE).write_text("{}")
    else:
        parties = tmp_path / "elsewhere"
        parties.mkdir()
    before = {p.name for p in run_dir.iterdir()}
    code, err = _finish(run_dir, parties, *extra)
    assert code == 2
    assert message in err
    assert {p.name for p in run_dir.iterdir()} <= before | {".lock"}


def test_a_flwr_output_being_finished_is_not_resumed_as_a_fedscore_run(tmp_path: Path):
    """After an interrupted finish (config.json and run.json written, no metrics.json) every
    hint names the same `fedscore finish` command, never `fedscore run --resume`."""
    run_dir, parties = _flwr_output(tmp_path)
    (run_dir / "config.json").write_text(json.dumps(to_flat(AuthorityConfig())))
    (run_dir / "run.json").write_text(json.dumps({"parties": str(parties),
                                                  "engine": "flwr run"}))
    command = f"fedscore finish {run_dir} --parties {parties}"
    resumed = run_cli("run", "--resume", str(run_dir), cwd=tmp_path, engine=False)
    assert resumed.returncode == 2
    assert command in " ".join(resumed.stderr.split())
    reported = run_cli("report", str(run_dir), cwd=tmp_path)
    assert f"`{command}`" in " ".join(reported.stderr.split())
    code, err = _finish(run_dir, tmp_path / "other")
    assert code == 2
    assert f"continue with: {command}" in err
