"""Privacy-budget sweeps: parsing, the summary statistics, resumption and refusal."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from simulations.run.sweep import (
    Cell,
    SweepError,
    SweepSpec,
    cell_dir,
    cell_row,
    claim_sweep,
    mean_ci,
    parse_epsilons,
    parse_seeds,
    summarise,
)
from tests.conftest import fix_secrets, run_cli
from tests.test_interrupt import aligned, assert_stopped_cleanly, interrupt


def test_epsilons_parse_sorted_with_inf():
    assert parse_epsilons("8, 0.5,inf,1") == (0.5, 1.0, 8.0, math.inf)


@pytest.mark.parametrize(("text", "problem"), [
    ("1,-2", "must be > 0"), ("0,1", "must be > 0"), ("1,abc", "not a number"),
    ("1,nan", "must be > 0"), ("1,1.0", "twice"),
])
def test_bad_epsilons_are_refused_by_name(text, problem):
    with pytest.raises(SweepError, match=problem):
        parse_epsilons(text)


def test_bad_seeds_are_refused():
    with pytest.raises(SweepError, match="whole numbers"):
        parse_seeds("0,x")
    with pytest.raises(SweepError, match="distinct"):
        parse_seeds("1,1")


def test_the_swept_keys_cannot_be_set():
    with pytest.raises(SweepError, match="--epsilons"):
        SweepSpec((1.0,), (0,), assignments=(("privacy.epsilon", "2"),))


def test_mean_ci_known_answer():
    # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    mean, low, high = mean_ci(pd.Series([1.0, 2.0, 3.0]), bounds=(-math.inf, math.inf))
    assert (mean, low, high) == pytest.approx((2.0, -0.4841, 4.4841), abs=1e-4)
    assert mean_ci(pd.Series([0.9, 0.95, 0.99]))[2] <= 1.0  # AUC intervals stay in 0..1
    assert math.isnan(mean_ci(pd.Series([0.8]))[1])


def test_summary_groups_done_runs_by_epsilon():
    table = pd.DataFrame({
        "epsilon": [1.0, 1.0, math.inf, 1.0], "seed": [0, 1, 0, 2],
        "status": ["done", "done", "done", "failed"],
        "auc": [0.80, 0.82, 0.86, None], "auc_all_test": [0.83, 0.85, 0.88, None],
        "auc_central": [0.86] * 3 + [None],
        "auc_central_dp": [0.84, 0.85, None, None], "auc_best_silo": [0.8] * 3 + [None],
        "auc_oracle": [0.87] * 3 + [None], "eps_model": [0.99, 0.98, math.inf, None],
        "audit_epsilon_lower": [0.0, 0.1, 0.3, None],
    })
    summary = summarise(table).set_index("epsilon")
    assert summary.loc[1.0, "n"] == 2
    assert summary.loc[1.0, "auc_mean"] == pytest.approx(0.81)
    assert summary.loc[1.0, "all_test_mean"] == pytest.approx(0.84)
    assert summary.loc[1.0, "audit_epsilon_lower_max"] == pytest.approx(0.1)
    assert math.isnan(summary.loc[math.inf, "central_dp_mean"])


def test_a_cells_row_keeps_each_auc_with_its_population(tmp_path: Path):
    """sweep.csv's `auc` is metrics.json's (scored test people), `auc_all_test` and the
    references' columns are every test person's."""
    cell = Cell(1.0, 0)
    cell_dir(tmp_path, cell).mkdir(parents=True)
    metrics = {"auc": 0.81, "all_test_auc": 0.85, "oracle_auc": 0.87,
               "baseline_central_auc": 0.86, "epsilon": {"model": 0.99, "label": None},
               "seconds": {"total": 1.0}}
    (cell_dir(tmp_path, cell) / "metrics.json").write_text(json.dumps(metrics))
    row = cell_row(tmp_path, cell)
    assert (row["auc"], row["auc_all_test"]) == (0.81, 0.85)
    assert (row["auc_oracle"], row["auc_central"]) == (0.87, 0.86)


def test_another_config_in_the_same_directory_is_refused(tmp_path: Path):
    claim_sweep(tmp_path / "s", SweepSpec((1.0, math.inf), (0,), users=2000))
    before = (tmp_path / "s" / "sweep.json").read_bytes()
    with pytest.raises(SweepError, match="epsilons"):
        claim_sweep(tmp_path / "s", SweepSpec((2.0,), (0,), users=2000))
    assert (tmp_path / "s" / "sweep.json").read_bytes() == before


@pytest.mark.slow
def test_sweep_runs_every_cell_once_and_resumes(tmp_path: Path):
    out = tmp_path / "sweep"
    args = ("sweep", "--out", str(out), "--users", "2000", "--epsilons", "2,inf",
            "--seeds", "3", "--set", "train.epochs=3",
            # Label DP off: 2,000 people and three epochs learn too little under eps_label 2 for
            # the AUC check below to say anything about the sweep's plumbing.
            "--set", "privacy.label_epsilon=inf",
            # Three full-batch DP steps cannot learn (server/privacy.py guardrails); the
            # sweep's plumbing is what is tested.
            "--set", "privacy.guardrails=warn",
            "--set", f"storage.keystore={tmp_path / 'keys'}")
    fix_secrets(tmp_path / "keys", "sweep")  # the same cells on every machine
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    table = pd.read_csv(out / "sweep.csv")
    assert list(table["status"]) == ["done", "done"]
    assert table["auc"].between(0, 1).all()
    # Only the non-private cell must have learnt: 2,000 people at eps 2 are mostly noise.
    assert table.loc[table["epsilon"] == math.inf, "auc"].item() > 0.65
    private = table[table["epsilon"] == 2].iloc[0]
    assert 0 <= private["audit_epsilon_lower"] <= private["eps_model"] <= 2.0
    assert 0 <= private["audit_canary_epsilon_lower"] <= private["eps_model"]
    verified = run_cli("ledger", "verify", str(out), cwd=tmp_path)  # every cell's ledger
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "NO" not in verified.stdout
    assert (table["auc_oracle"] >= table["auc"] - 0.05).all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["epsilon"]) == [2.0, math.inf]
    runs = out / "runs"
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in runs.rglob("*.json")}

    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 of 2 cells to run" in again.stderr
    assert digests == {p: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in runs.rglob("*.json")}

    other = run_cli("sweep", "--out", str(out), "--users", "2000", "--epsilons", "1",
                    "--seeds", "3", cwd=tmp_path)
    assert other.returncode == 2
    assert "another configuration" in other.stderr
    assert json.loads((out / "sweep.json").read_text())["epsilons"] == ["2", "inf"]

    # One Ctrl-C while a cell starts training (no round ended): the sweep stops at once with
    # nothing left running; the same command starts that cell again, to the same results.
    cell = runs / "eps=2_seed=3"
    cell.rename(tmp_path / "uninterrupted")
    stopped = interrupt(*args, cwd=tmp_path, when=lambda: aligned(cell))
    assert_stopped_cleanly(stopped)
    assert "fedscore sweep --out" in stopped.output
    resumed = run_cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of 2 cells to run" in resumed.stderr
    assert (out / "unfinished" / "eps=2_seed=3-1" / "config.json").exists()  # kept aside
    # The auditor's canary coins are fresh in every run; everything else is the run's own.
    fresh = ["seconds", "audit_canary_epsilon_lower"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "sweep.csv").drop(columns=fresh),
                                  table.drop(columns=fresh))
