"""Interrupt and resume: a crashed run, resumed, equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, scores_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(interrupted_runs: dict[str, Path]) -> tuple[Path, Path]:
    """A run stopped at round 3 by a faulty silo (payments sends one contribution too few),
    resumed from its round-2 checkpoint once the silo behaves; and the same run uninterrupted
    (conftest's interrupted_runs, whose keystore test_encrypted_run checks). (An authority that
    crashes on its own is resumed in test_security_rundir and the leak canary; killed processes
    under the deployment engine in test_faults.)"""
    return interrupted_runs["crashed"], interrupted_runs["full"]


def test_malformed_contributions_stop_the_run_naming_the_silo(runs):
    stderr = (runs[0] / "stderr.txt").read_text()
    assert "silo 'payments' sent" in stderr
    assert "contributions for" in stderr
    assert f"fedscore run --resume {runs[0]}" in stderr


def test_resumed_run_reports_the_same_epsilon(runs):
    crashed, full = (json.loads((r / "metrics.json").read_text()) for r in runs)
    assert crashed["epsilon"] == full["epsilon"]
    assert crashed["training_steps"] == full["training_steps"]


def test_ledger_neither_double_counts_nor_drops_a_step(runs):
    crashed, full = runs
    assert _model_lines(crashed) == _model_lines(full)
    rounds = [r for party, r, _, _ in _model_lines(crashed) if party == "authority"]
    assert rounds == sorted(set(rounds))


def test_resumed_model_matches_the_uninterrupted_one(runs):
    """Same keystores, same config: the run key, the secret streams and so the whole run are
    the same, and a resume replays the interrupted round with the same noise (it releases
    nothing new): the resumed run is the uninterrupted one, bit for bit."""
    crashed, full = (json.loads((r / "authority.json").read_text()) for r in runs)
    assert crashed["model"]["run_key"] == full["model"]["run_key"]
    assert crashed["scored_test"] == full["scored_test"]
    assert crashed["all_test"] == full["all_test"]
    assert scores_of(runs[0])["probability"].equals(scores_of(runs[1])["probability"])


def _model_lines(run: Path) -> list[tuple]:
    entries = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
    return [(e["party"], e["round"], e["steps"], e["epsilon"]) for e in entries
            if e["budget"] == "model"]


def test_checkpoint_is_removed_after_success(runs):
    crashed, _ = runs
    assert not (crashed / "checkpoint").exists()


def test_resuming_a_finished_run_is_refused(runs, tmp_path: Path):
    crashed, _ = runs
    before = (crashed / "metrics.json").read_bytes()
    proc = run_cli("run", "--resume", str(crashed), cwd=tmp_path, engine=False)
    assert proc.returncode == 2
    assert "already finished" in proc.stderr
    assert (crashed / "metrics.json").read_bytes() == before


def test_resuming_with_another_config_is_refused(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train.epochs": 2}))
    (run / "run.json").write_text(json.dumps({"parties": str(tmp_path / "p")}))
    proc = run_cli("run", "--resume", str(run), "--set", "train.epochs=5", cwd=tmp_path,
                   engine=False)
    assert proc.returncode == 2
    assert "different configuration (train.epochs" in proc.stderr
    assert json.loads((run / "config.json").read_text()) == {"train.epochs": 2}
