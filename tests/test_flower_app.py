"""`flwr run .`: the same ServerApp and ClientApp under Flower's own launcher."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from server.scores_file import read_scores
from tests.conftest import ENGINE_ENV, fix_secrets, processes_using, run_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_flwr_run_trains_and_leaves_no_process(tmp_path: Path):
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
