"""A private run end to end: budgets, the cap, the ledger and its independent verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server import ledger, ledger_lines
from simulations.analysis.ledger_verify import verify
from tests.conftest import run_cli, scores_of

pytestmark = pytest.mark.slow


def test_metrics_report_every_budget(private_run: Path):
    m = json.loads((private_run / "metrics.json").read_text())
    eps = m["epsilon"]
    assert set(eps) == {"model", "model_by_population", "model_per_party", "label",
                        "transcript"}
    # The headline is ONE number for the combined model: the larger of the training and the
    # validation populations' compositions.
    assert eps["model"] == max(eps["model_by_population"].values())
    per_party = {k: v for k, v in eps["model_per_party"].items() if k != "note"}
    assert set(per_party) == {"payments", "social", "device", "authority"}
    assert all(v < eps["model"] for v in per_party.values())
    assert eps["label"] == 5
    assert eps["transcript"] is None
    assert m["accountant"] == "rdp"
    assert m["blocks"] == 4
    assert m["noise_multiplier"] == pytest.approx(2 * m["joint_noise_multiplier"])
    n_train = m["people"]["train"]
    assert m["delta"] == pytest.approx(0.1 / n_train)


def test_the_cap_stops_training_before_it_is_passed(private_run: Path):
    m = json.loads((private_run / "metrics.json").read_text())
    assert m["stopped_by_budget_cap"] is True
    assert 0 < m["epsilon"]["model_by_population"]["train"] <= 28.0
    assert m["epsilon"]["model"] <= 28.0  # the cap covers validation people too
    entries = ledger.read(private_run)
    refused = [e for e in entries if e.get("event") == "refused"]
    assert len(refused) == 1
    assert refused[0]["epsilon"] > 28.0  # what the refused steps would have cost
    joint = [e for e in entries if e["mechanism"] == "joint_poisson_gaussian"]
    assert max(e["epsilon"] for e in joint) <= 28.0
    assert m["training_steps"] == sum(e["steps"] for e in joint)


def test_ledger_is_consistent_and_verifies_independently(private_run: Path):
    entries = ledger.read(private_run)
    label = [e for e in entries if e["budget"] == "label"]
    assert label == [label[0]]
    assert label[0]["mechanism"] == "randomized_response"
    # Every party's preparation statistics (the authority's prior) come first, then the joint
    # DP-SGD rounds with their blocks, then the calibration on validation people.
    statistics = [e for e in entries if e.get("population") == "all"]
    assert [(e["party"], e["purpose"]) for e in statistics] == [
        ("payments", "preparation statistics"), ("social", "preparation statistics"),
        ("device", "preparation statistics"), ("payments", "contribution summary"),
        ("social", "contribution summary"), ("device", "contribution summary"),
        ("authority", "prior")]
    joint = [e for e in entries if e["mechanism"] == "joint_poisson_gaussian"]
    assert all(len(e["blocks"]) == 4 for e in joint)
    eps = [e["epsilon"] for e in statistics + joint]
    assert eps == sorted(eps), "cumulative epsilon never decreases"
    assert [e["purpose"] for e in entries if e.get("population") == "val"] == ["calibration"]
    # Every line is a typed line, which writes itself back as the run wrote it.
    typed = ledger_lines.read(private_run)
    assert [{"seq": e["seq"], **x.to_json()} for e, x in zip(entries, typed, strict=True)] \
        == entries
    checks = verify(private_run)
    assert [c.budget for c in checks] == ["model/train", "model/val", "label"]
    assert all(c.ok for c in checks), [(c.party, c.reported, c.independent) for c in checks]


def test_ledger_verify_command_fails_on_a_tampered_ledger(private_run: Path, tmp_path: Path):
    ok = run_cli("ledger", "verify", str(private_run), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    lines = (private_run / "ledger.jsonl").read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    for e in entries:
        if e["mechanism"] == "joint_poisson_gaussian":
            e["epsilon"] *= 0.8  # under-report the combined model's spend
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
    accounted = metrics["epsilon"]["model"]
    assert audit["accounted_epsilon"] == accounted
    assert 0 <= audit["epsilon_lower"] <= accounted
    # The attack sees released scores: every scored person of each split (none for ineligible).
    scores = scores_of(private_run, with_split=True)
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
    # KS on 5-point score steps: coarser thresholds can only lower it; where the scores spread
    # over many steps it matches the metrics' KS on probabilities.
    assert gap <= metrics["ks"] + 0.05
    scores = scores_of(private_run, with_split=True)
    steps = (scores.loc[scores["split"] == "test", "score"].dropna() // 5).nunique()
    if steps >= 20:
        assert gap == pytest.approx(metrics["ks"], abs=0.05)


def test_released_scores_carry_no_split(private_run: Path):
    scores = scores_of(private_run)
    assert "split" not in scores.columns
    assert not any("split" in c for c in scores.columns)


def test_by_default_the_authority_sees_only_the_sum(private_run: Path,
                                                   small_run: Path):
    """The README's promise: per-silo points are a research switch that says what it reveals."""
    scores = scores_of(private_run)
    assert not [c for c in scores.columns if c.startswith(("points_", "reason_"))]
    seen = json.loads((private_run / "authority.json").read_text())["authority_sees"]
    assert seen == ["the per-person sum of the silos' contributions"]
    switched = json.loads((small_run / "authority.json").read_text())["authority_sees"]
    assert len(switched) == 2
    assert "points per person" in switched[1]


def test_same_keystore_reproduces_the_run_and_fresh_secrets_do_not(
        interrupted_runs: dict[str, Path]):
    """The public seed decides only the data and the initialisation: rerun with the same
    keystores, the run is the same bit for bit; with fresh randomness secrets (the tables'
    data keys kept), the noise, plans, flips and split all differ. On conftest's
    interrupted_runs (3,000 people, DP-SGD and label DP at their defaults): its first run (it
    made the keystore; stopped by a faulty silo and resumed, test_resume checks the resume
    releases nothing new), the second run with the same parties and keystore ("full"), then a
    run with a copy of both whose randomness secrets are gone ("fresh")."""
    from crypto.secret_random import SECRET_FILE

    first, again, fresh, keys = (interrupted_runs[k]
                                 for k in ("full", "crashed", "fresh", "keys"))
    m = json.loads((first / "metrics.json").read_text())
    # Noise is in play: DP-SGD's and randomised response's draws come from the secrets.
    assert 0 < m["epsilon"]["model"] < float("inf")
    assert m["epsilon"]["label"] == 2
    assert m["noise_multiplier"] > 0

    one, two = (json.loads((r / "metrics.json").read_text()) for r in (first, again))
    assert one["auc"] == two["auc"]
    assert _run_key(first) == _run_key(again)
    assert (first / "ledger.jsonl").read_bytes() == (again / "ledger.jsonl").read_bytes()
    assert scores_of(first)["probability"].equals(scores_of(again)["probability"])

    secrets = sorted(keys.glob(SECRET_FILE.format(party="*")))
    assert {p.name for p in secrets} >= {SECRET_FILE.format(party=s) for s in
                                         ("authority", "payments", "social", "device")}
    # The fresh run made its own secrets, none of them the same.
    fresh_secrets = {p.name: p.read_bytes()
                     for p in interrupted_runs["fresh_keys"].glob(SECRET_FILE.format(party="*"))}
    assert {p.name for p in secrets} <= set(fresh_secrets)
    assert all(fresh_secrets[p.name] != p.read_bytes() for p in secrets)
    assert _run_key(fresh) != _run_key(first)
    a, b = scores_of(first, True), scores_of(fresh, True)
    assert not a["probability"].equals(b["probability"])
    # The split is a fresh secret draw: about 70 % of training people stay training people by
    # chance, not all of them.
    same_train = ((a["split"] == "train") & (b["split"] == "train")).sum()
    assert same_train < 0.8 * (a["split"] == "train").sum()


def _run_key(run: Path) -> str:
    return json.loads((run / "authority.json").read_text())["model"]["run_key"]
