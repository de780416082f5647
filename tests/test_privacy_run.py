"""A private run end to end: budgets, the cap, the ledger and its independent verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server import ledger
from simulations.ledger_verify import verify
from tests.conftest import run_cli, scores_of

pytestmark = pytest.mark.slow


def test_metrics_report_every_budget(private_run: Path):
    m = json.loads((private_run / "metrics.json").read_text())
    assert set(m["epsilon"]) == {"model", "label", "transcript"}
    assert set(m["epsilon"]["model"]) == {"payments", "social", "device", "authority"}
    assert m["epsilon"]["label"] == 5
    assert m["epsilon"]["transcript"] == {"payments": None, "social": None, "device": None}
    assert m["accountant"] == "rdp"
    assert 0 < m["delta"] < 1 / 1000


def test_the_cap_stops_training_before_it_is_passed(private_run: Path):
    m = json.loads((private_run / "metrics.json").read_text())
    assert m["stopped_by_budget_cap"] is True
    assert all(0 < e <= 1.2 for e in m["epsilon"]["model"].values())
    entries = ledger.read(private_run)
    refused = [e for e in entries if e.get("event") == "refused"]
    assert len(refused) == 1
    assert refused[0]["epsilon"] > 1.2  # what the refused steps would have cost
    spent = [e for e in entries if e["budget"] == "model" and e.get("event") is None]
    assert max(e["epsilon"] for e in spent) <= 1.2
    assert m["training_steps"] == sum(e["steps"] for e in spent if e["party"] == "authority")


def test_ledger_is_consistent_and_verifies_independently(private_run: Path):
    entries = ledger.read(private_run)
    label = [e for e in entries if e["budget"] == "label"]
    assert label == [label[0]]
    assert label[0]["mechanism"] == "randomized_response"
    for party in ("payments", "social", "device", "authority"):
        eps = [e["epsilon"] for e in entries if e["party"] == party and e["budget"] == "model"]
        assert eps == sorted(eps), "cumulative epsilon never decreases"
    checks = verify(private_run)
    assert len(checks) == 5
    assert all(c.ok for c in checks), [(c.party, c.reported, c.independent) for c in checks]


def test_ledger_verify_command_fails_on_a_tampered_ledger(private_run: Path, tmp_path: Path):
    ok = run_cli("ledger", "verify", str(private_run), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    lines = (private_run / "ledger.jsonl").read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    for e in entries:
        if e["party"] == "device" and e["budget"] == "model":
            e["epsilon"] *= 0.8  # under-report the device silo's spend
    (tampered / "ledger.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    bad = run_cli("ledger", "verify", str(tampered), cwd=tmp_path)
    assert bad.returncode == 1
    assert "NO" in bad.stdout


def test_private_model_still_learns(private_run: Path):
    # 3,000 people, stopped early by the cap, labels randomised: hard, but far from chance
    # (a sign or routing error lands at or below 0.5).
    m = json.loads((private_run / "metrics.json").read_text())
    assert m["auc"] > 0.6
    assert m["baseline_central_dp_auc"] is not None


def test_audit_bound_stays_below_the_accounted_epsilon(private_run: Path):
    metrics = json.loads((private_run / "metrics.json").read_text())
    audit = metrics["audit"]
    accounted = max(metrics["epsilon"]["model"].values())
    assert audit["accounted_epsilon"] == accounted
    assert 0 <= audit["epsilon_lower"] <= accounted
    # The attack sees released scores: every scored person of each split (none for ineligible).
    scores = scores_of(private_run)
    released = scores[scores["status"] == "scored"]
    assert audit["n_members"] == (released["split"] == "train").sum()
    assert audit["n_nonmembers"] == (released["split"] == "test").sum()
    assert 0 < len(scores) - len(released) < 0.2 * len(scores)


def test_curves_hold_only_aggregates_that_match_the_metrics(private_run: Path):
    curves = json.loads((private_run / "curves.json").read_text())
    metrics = json.loads((private_run / "metrics.json").read_text())
    histogram = curves["score_histogram"]["counts"]
    assert {k: sum(v) for k, v in histogram.items()} == metrics["tiers"]
    calibration = {row["tier"]: row for row in curves["calibration_by_tier"]}
    for tier, rate in metrics["test_default_rate_by_tier"].items():
        if rate is not None:
            assert calibration[tier]["observed_default_rate"] == pytest.approx(rate)
            assert calibration[tier]["ci_low"] <= rate <= calibration[tier]["ci_high"]
    ks = curves["ks"]
    gap = max(abs(b - g) for b, g in zip(ks["cdf_bad"], ks["cdf_good"], strict=True))
    assert gap == pytest.approx(metrics["ks"], abs=0.05)  # KS on 5-point score steps
