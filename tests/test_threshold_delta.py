"""The delta of the silos' category thresholds: reserved out of the configured delta, on each
statistics release's ledger line, in the combined model's delta, and re-derived by
`fedscore ledger verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clients.protocol.accounting import epsilon
from clients.protocol.dp_constants import PRIOR_NOISE_MULTIPLIER, STATISTICS_NOISE_MULTIPLIER
from clients.silo.data import THRESHOLD_DELTA, statistics_mechanism
from server import ledger
from server.config import ConfigError, PrivacyConfig
from server.ledger import Ledger
from server.privacy import PrivacyPlan
from simulations.analysis.ledger_verify import consistency, independent_epsilon, verify
from simulations.run.config import check_delta_reservation, make_config

SILOS = ("payments", "social", "device")
# Small enough that the reservation (3e-9) moves epsilon visibly: 30 % of the delta.
CONFIGURED = 1e-8
RESERVED = 3 * THRESHOLD_DELTA


@pytest.fixture(scope="module")
def planned_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PrivacyPlan, dict]:
    """A calibrated plan's ledger and summary: statistics, one final round, the calibration
    (made once: each plan calibrates its noise, half a second)."""
    directory = tmp_path_factory.mktemp("threshold_delta")
    cfg = PrivacyConfig(epsilon=1.0, delta=CONFIGURED, accountant="rdp")
    plan = PrivacyPlan(cfg, SILOS, 20_000, 500, 2, ledger=Ledger(directory))
    plan.record_start()
    plan.spend(plan.steps_planned)
    plan.record_round(1, dict.fromkeys(SILOS, plan.party_history), final=True)
    plan.record_calibration(2)
    summary = plan.summary()
    plan.close()
    return directory, plan, summary


def test_each_silo_statistics_release_reserves_its_threshold_delta(planned_ledger):
    """Known answer: the accountant composes at what the thresholds leave of the configured
    delta, and the combined delta (accountant + thresholds) never exceeds the configured."""
    _, plan, summary = planned_ledger
    assert statistics_mechanism()["extra_delta"] == THRESHOLD_DELTA
    accountant = CONFIGURED - RESERVED
    assert summary["delta_accountant"] == pytest.approx(accountant, rel=1e-12)
    assert summary["delta_thresholds"] == pytest.approx(RESERVED, rel=1e-12)
    assert summary["delta"] <= CONFIGURED
    assert summary["delta"] == pytest.approx(CONFIGURED, rel=1e-12)
    history = [(STATISTICS_NOISE_MULTIPLIER, 1.0, 3), (PRIOR_NOISE_MULTIPLIER, 1.0, 1),
               (plan.joint_sigma, plan.q, plan.steps_planned)]
    train = summary["epsilon"]["model_by_population"]["train"]
    assert train == pytest.approx(epsilon("rdp", history, accountant), rel=1e-9)
    # The reservation is not a rounding error: at the configured delta the same steps would
    # claim a visibly smaller epsilon, and the calibration still meets the target.
    assert epsilon("rdp", history, CONFIGURED) < train - 0.005
    assert 0.95 <= summary["epsilon"]["model"] <= 1.0


def test_the_ledger_carries_the_threshold_delta_and_verify_rederives_it(planned_ledger):
    tmp_path, _, summary = planned_ledger
    entries = ledger.read(tmp_path)
    statistics = [e for e in entries if e.get("purpose") == "preparation statistics"]
    assert [e["party"] for e in statistics] == list(SILOS)
    assert [e["extra_delta"] for e in statistics] == [THRESHOLD_DELTA] * 3
    # Each line's (epsilon, delta) holds for everything up to it: the accountant's delta plus
    # the thresholds released so far.
    accountant = summary["delta_accountant"]
    assert [e["delta"] for e in statistics] == pytest.approx(
        [accountant + k * THRESHOLD_DELTA for k in (1, 2, 3)], rel=1e-12)
    model = [e for e in entries if e["budget"] == "model"]
    assert {e["purpose"] for e in model if "extra_delta" in e} == {"preparation statistics"}
    assert max(e["delta"] for e in model) == summary["delta"] <= CONFIGURED
    checks = {c.budget: c for c in verify(tmp_path)}
    for population in ("train", "val"):
        check = checks[f"model/{population}"]
        assert check.ok
        assert check.reported == summary["epsilon"]["model_by_population"][population]
        assert check.delta == summary["delta"]
        assert check.extra_delta == pytest.approx(RESERVED, rel=1e-12)
    # dp-accounting composes at the accountant's delta, not at the combined one.
    from server.ledger_lines import budget_event, read

    lines = [x for x in read(tmp_path) if x.budget == "model" and x.population != "val"]
    assert checks["model/train"].independent == independent_epsilon(
        budget_event(lines), accountant, "rdp")
    assert consistency(tmp_path) == []


def test_verify_refuses_a_combined_delta_above_the_runs(planned_ledger, tmp_path: Path):
    shutil.copy(planned_ledger[0] / ledger.LEDGER_FILE, tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"delta": CONFIGURED - RESERVED}))
    problems = consistency(tmp_path)
    assert any("delta" in p and "above the run's delta" in p for p in problems), problems


def test_a_delta_the_thresholds_would_use_up_is_refused():
    with pytest.raises(ConfigError, match="category thresholds"):
        PrivacyPlan(PrivacyConfig(epsilon=1.0, delta=RESERVED, accountant="rdp"), SILOS,
                    20_000, 500, 2, ledger=None)
    # Without DP-SGD nothing is accounted and nothing reserved.
    plan = PrivacyPlan(PrivacyConfig(epsilon=float("inf"), delta=RESERVED), SILOS, 20_000,
                       500, 2, ledger=None)
    assert plan.summary()["delta"] == RESERVED
    plan.close()

    # The run's own check before the engine: the same refusal, and none for what the plan keeps.
    with pytest.raises(ConfigError, match="category thresholds"):
        check_delta_reservation(make_config({"privacy.delta": f"{RESERVED!r}"}), SILOS)
    check_delta_reservation(make_config({"privacy.delta": f"{CONFIGURED!r}"}), SILOS)
    check_delta_reservation(make_config({"privacy.delta": f"{RESERVED!r}",
                                         "privacy.epsilon": "inf"}), SILOS)


@pytest.mark.slow
def test_the_run_refuses_such_a_delta_before_any_engine_starts(tmp_path: Path):
    """The same refusal before the engine (and PSI) starts: engine=False runs the command in
    this process with the engine barred, so a refusal that came later would fail here."""
    from tests.conftest import run_cli

    proc = run_cli("run", "--out", str(tmp_path / "run"), "--users", "1000",
                   "--set", f"privacy.delta={RESERVED:g}", cwd=tmp_path, engine=False)
    assert proc.returncode != 0
    assert "category thresholds" in proc.stderr + proc.stdout
    assert f"privacy.delta={RESERVED:.3g}" in proc.stderr + proc.stdout
