"""`flwr run .`: the same ServerApp and ClientApp under Flower's own launcher."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from server.authority import read_scores
from tests.conftest import ENGINE_ENV, run_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _processes_using(flwr_home: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"FLWR_HOME={flwr_home}".encode() in (proc / "environ").read_bytes():
                status = (proc / "status").read_text()
                if "State:\tZ" not in status:
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_flwr_run_trains_and_leaves_no_process(tmp_path: Path):
    parties, out, home = tmp_path / "parties", tmp_path / "out", tmp_path / "flwr"
    assert run_cli("generate", "--parties", str(parties), "--users", "2000",
                   cwd=tmp_path).returncode == 0
    env = {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(home)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "flwr-run.sh"), "--run-config",
         f'data-dir="{parties}" out-dir="{out}" train.epochs=1'],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = out.iterdir()  # one subdirectory per Flower run
    metrics = json.loads((run_dir / "authority.json").read_text())
    assert metrics["auc"] > 0.7
    assert metrics["config"]["train.epochs"] == 1
    # storage.keystore=auto: encrypted, keystore beside the parties, shared by every party.
    scores = read_scores(run_dir, parties.with_name(parties.name + ".keys"))
    assert len(scores) == metrics["people"]["aligned"]
    assert next((parties / "payments" / "checkpoints").iterdir()).joinpath(
        "alignment.npy.enc").exists()
    assert _processes_using(home) == []
