"""metrics.json's one layout (simulations/run/outcome.py): the shared keys, each once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.data.paths import Parties
from simulations.run.config import make_config
from simulations.run.outcome import Comparison, Outcome, merge_seconds, write_metrics
from simulations.run.rundir import Run


def _run(tmp_path: Path) -> Run:
    out = tmp_path / "run"
    out.mkdir()
    run = Run(make_config(), out, Parties(tmp_path / "parties"), resume=False)
    run.authority["seconds"] = {"train": 2.0, "score": 0.5}
    return run


def _outcome(own: dict, oracle: float | None = 0.9) -> Outcome:
    comparison = Comparison(oracle=oracle, central=0.85, central_dp=None,
                            best="payments", best_auc=0.7)
    figures = {"auc": 0.8, "ks": 0.4, "gini": 0.6, "brier": 0.1, "log_loss": 0.3}
    return Outcome(
        figures={"auc": 0.75, "ks": 0.35}, all_test_figures=figures, comparison=comparison,
        tiers={"A": 3}, default_rate_by_tier={"A": 0.1}, people={"aligned": 3}, round_trips=5,
        aggregation_mode="sum", privacy={"epsilon": {"model": 1.0}, "delta": 1e-5},
        audit={"epsilon_lower": 0.2}, history={"federated": []},
        baselines={"central": {"auc": 0.85}}, own=own)


def test_comparison_gaps_are_against_the_federated_auc():
    shown = _outcome({}).comparison.to_dict(0.8)
    assert shown["gap_to_oracle"] == pytest.approx(0.1)
    assert shown["gap_to_central"] == pytest.approx(0.05)
    assert shown["baseline_best_silo"] == "payments"
    assert shown["baseline_best_silo_auc"] == 0.7
    # Real data has no oracle: no gap to it either.
    assert _outcome({}, oracle=None).comparison.to_dict(0.8)["gap_to_oracle"] is None


def test_each_figure_is_on_one_named_population(tmp_path: Path):
    """`auc` ... are the score's, on the scored test people; `all_test_*` every test
    person's; the gaps to the oracle and the central model are taken on the population those
    references see (all test people), never across populations."""
    run = _run(tmp_path)
    merge_seconds(run, 3.0)
    written = write_metrics(run, _outcome({}), {})
    assert (written["auc"], written["ks"]) == (0.75, 0.35)
    assert written["gini"] is None  # the scored population's figures that were not measured
    assert written["all_test_auc"] == 0.8
    assert written["all_test_log_loss"] == 0.3
    assert written["gap_to_oracle"] == pytest.approx(0.9 - written["all_test_auc"])
    assert "scored_test_auc" not in written


def test_engine_seconds_are_the_federation_less_what_the_authority_measured(tmp_path: Path):
    run = _run(tmp_path)
    seconds = merge_seconds(run, 3.0)
    assert seconds == {"train": 2.0, "score": 0.5, "engine": 0.5}


def test_written_metrics_hold_shared_and_own_keys(tmp_path: Path):
    run = _run(tmp_path)
    merge_seconds(run, 3.0)
    written = write_metrics(run, _outcome({"topology": "horizontal"}), {"roc": None})
    on_disk = json.loads((run.out_dir / "metrics.json").read_text())
    assert on_disk == written
    assert on_disk["topology"] == "horizontal"
    assert on_disk["data"] == "generated"
    assert on_disk["seconds"]["total"] >= 0
    assert on_disk["seconds"]["engine"] == 0.5
    assert on_disk["epsilon"] == {"model": 1.0}
    assert (run.out_dir / "manifest.json").exists()


def test_own_keys_may_not_alias_a_shared_one(tmp_path: Path):
    run = _run(tmp_path)
    with pytest.raises(ValueError, match="baseline_best_silo_auc"):
        write_metrics(run, _outcome({"baseline_best_silo_auc": 0.7}), {})
    assert not (run.out_dir / "metrics.json").exists()
