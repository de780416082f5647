"""Settings for the red team's `overfit` run (tests/test_attacks.py, issue 19): run it as the
test does with some settings changed, and score the two attacks the way its tests do.

    PYTHONPATH=. .venv/bin/python bench/red_team_overfit.py NAME LABEL [KEY=VALUE ...]

Runs in /tmp/fedscore-overfit/NAME/LABEL and appends a JSON line to
/tmp/fedscore-overfit/results.jsonl. LABEL names the run directory, which fixes the secrets
(tests/conftest.py fix_secrets): "run" gives the test's own; others redraw the split and the
batch plans. KEY is a `--set` key of the fixture's OVERFIT_SETTINGS, or `users`. The tests
need sign accuracy >= 0.99, norm AUC >= 0.9 and z = (AUC - 0.5) / SE > 3.3; a setting to
adopt should reach z >= 4.5 at "run" and 3.3 with two other labels.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from clients.protocol.capture import CAPTURE_ENV
from simulations.analysis import redteam as rt
from simulations.analysis import redteam_gradients as rt_grad
from simulations.analysis import redteam_leaks as rt_leaks
from simulations.analysis import redteam_scoring as rt_score
from tests.conftest import run_cli
from tests.test_attacks import OVERFIT_SETTINGS, OVERFIT_USERS, _scored, set_options

ROOT = Path("/tmp/fedscore-overfit")


def scores(out: Path, capture: Path) -> dict:
    """Both tests' figures for a finished run."""
    truth, view = rt_score.Truth.load(out), rt.silo_views(capture)["payments"]
    y, acc, _, _ = _scored(rt_grad.sign_attack(view), truth)
    _, _, _, norm_auc = _scored(rt_grad.norm_attack(view), truth)
    result = rt_leaks.membership(truth)
    se = rt_score.auc_standard_error(result.attack_auc, result.n_members, result.n_nonmembers)
    return {"all_trained": len(y) == int((truth.split == 0).sum()), "sign_acc": acc,
            "norm_auc": norm_auc, "mia_auc": result.attack_auc, "mia_se": se,
            "z": (result.attack_auc - 0.5) / se, "members": result.n_members,
            "others": result.n_nonmembers}


def main() -> None:
    name, label, *overrides = sys.argv[1:]
    settings, users = dict(OVERFIT_SETTINGS), str(OVERFIT_USERS)
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "users":
            users = value
        else:
            settings[key] = value
    work = ROOT / name
    work.mkdir(parents=True)
    out, capture = work / label, work / "capture"
    os.environ[CAPTURE_ENV] = str(capture)
    t0 = time.perf_counter()
    proc = run_cli("-v", "run", "--out", str(out), "--users", users, "--seed", "5",
                   *set_options(settings), cwd=work, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    metrics = json.loads((out / "metrics.json").read_text())
    row = {"name": name, "label": label, "overrides": overrides,
           "round_trips": metrics["round_trips"], "wall": round(wall, 1),
           "seconds": metrics["seconds"], **scores(out, capture)}
    print(json.dumps(row))
    with open(ROOT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
