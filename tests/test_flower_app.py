"""`flwr run .`: the same ServerApp and ClientApp under Flower's own launcher."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from server import run_phases
from server.scores_file import read_scores
from tests.conftest import ENGINE_ENV, fix_secrets, processes_using, run_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_flwr_run_trains_and_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    parties, out, home = tmp_path / "parties", tmp_path / "out", tmp_path / "flwr"
    fix_secrets(parties.with_name(parties.name + ".keys"), "flwr-run")  # same run everywhere
    assert run_cli("generate", "--parties", str(parties), "--users", "2000",
                   cwd=tmp_path).returncode == 0
    env = {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(home)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "flwr-run.sh"), "--run-config",
         f'data-dir="{parties}" out-dir="{out}" train.epochs=1 train.batch_size=256 '
         'privacy.epsilon=inf privacy.label_epsilon=inf'],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = out.iterdir()  # one subdirectory per Flower run
    metrics = json.loads((run_dir / "authority.json").read_text())
    assert metrics["scored_test"]["auc"] > 0.7
    assert metrics["config"]["train.epochs"] == 1
    # storage.keystore=auto: encrypted, keystore beside the parties, shared by every party.
    scores = read_scores(run_dir, parties.with_name(parties.name + ".keys"))
    assert len(scores) == metrics["people"]["aligned"]
    # The run's checkpoint folder (beside it, the silo's PSI step markers).
    (run_ckpt,) = [p for p in (parties / "payments" / "checkpoints").iterdir() if p.is_dir()]
    assert (run_ckpt / "alignment.npy.enc").exists()
    assert processes_using(home) == []
    finish_makes_it_reportable(run_dir, parties, tmp_path, monkeypatch)


def finish_makes_it_reportable(run_dir: Path, parties: Path, cwd: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedscore finish` completes the `flwr run .` output into a run directory that
    `fedscore report` reads, with the authority's own figures; a finish that fails is
    continued by the same command."""
    authority = json.loads((run_dir / "authority.json").read_text())
    refused = run_cli("report", str(run_dir), cwd=cwd)
    assert refused.returncode == 2
    assert f"fedscore finish {run_dir} --parties" in " ".join(refused.stderr.split())
    command = ("finish", str(run_dir), "--parties", str(parties))
    with monkeypatch.context() as env:
        env.setenv(run_phases.FAIL_AT_PHASE, "audit")  # a crash after the baselines
        assert run_cli(*command, cwd=cwd).returncode != 0
    assert not (run_dir / "metrics.json").exists()
    stopped = run_cli("report", str(run_dir), cwd=cwd)
    assert f"fedscore finish {run_dir} --parties {parties}" in " ".join(stopped.stderr.split())
    finished = run_cli(*command, cwd=cwd)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "configuration: population:" in finished.stderr  # says where the config came from
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "baselines" not in metrics["seconds"]  # kept by the failed attempt, not redone
    assert metrics["auc"] == authority["scored_test"]["auc"]
    assert metrics["all_test_auc"] == authority["all_test"]["auc"]
    assert metrics["oracle_auc"] > 0.7  # generated data: the truth is known
    assert metrics["baseline_central_auc"] > 0.7
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train.epochs"] == 1
    assert config["population.users"] == 2000
    assert json.loads((run_dir / "run.json").read_text())["parties"] == str(parties)
    again = run_cli(*command, cwd=cwd)
    assert again.returncode == 2
    assert "finished already" in " ".join(again.stderr.split())
    report = run_cli("report", str(run_dir), cwd=cwd)
    assert report.returncode == 0, report.stdout + report.stderr
    headline = pd.read_csv(run_dir / "report" / "headline.csv").set_index("metric")["value"]
    assert float(headline["auc"]) == authority["scored_test"]["auc"]
    assert float(headline["all_test_auc"]) == authority["all_test"]["auc"]
