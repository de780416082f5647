"""metrics.json, one implementation for both topologies.

Each topology (experiment.py vertical, horizontal.py) measures its own way and fills an
`Outcome`; the parts every run directory shares (the test figures, the comparison with the
baselines and the oracle, timings, the privacy summary, audit, history, data description and
manifest) are laid out here once, so a key means one figure, under one name, in every run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from simulations.analysis.audit import AuditResult
from simulations.run.rundir import Run, write_results

MEMBERSHIP_METHOD = "loss-threshold membership attack"


def merge_seconds(run: Run, federation_seconds: float) -> dict[str, float]:
    """The run's phase timings with the authority's own, and the engine's overhead (the
    federated wall time the authority did not account for)."""
    seconds = run.timer.seconds
    measured = run.authority["seconds"]
    seconds.update(measured)
    seconds["engine"] = round(federation_seconds - sum(measured.values()), 3)
    return seconds


def membership_summary(result: AuditResult, accounted_epsilon: float | None) -> dict:
    """The membership attack's result as metrics.json's `audit` holds it, beside the epsilon
    it must stay below."""
    return {**result.to_dict(), "method": MEMBERSHIP_METHOD,
            "accounted_epsilon": accounted_epsilon}


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """The federated model against what it is measured by, on the test split: the oracle (the
    true probabilities; None on real data), the central model with and without DP, and the
    best single party alone (a silo, or a region)."""

    auc: float
    oracle: float | None
    central: float
    central_dp: float | None
    best: str
    best_auc: float
    # A credit analyst's central references (simulations/analysis/references.py) by name;
    # None for one a run resumed from an older version's saved baselines lacks.
    references: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "oracle_auc": self.oracle,
            "baseline_central_auc": self.central,
            "baseline_central_dp_auc": self.central_dp,
            **{f"baseline_{name}_auc": value for name, value in self.references.items()},
            "baseline_best_silo_auc": self.best_auc,
            "baseline_best_silo": self.best,
            "gap_to_oracle": self.oracle - self.auc if self.oracle is not None else None,
            "gap_to_central": self.central - self.auc,
        }


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What a finished run measured, as both topologies report it; `own` holds the keys only
    one topology writes (it may not reuse a shared key: one key per figure)."""

    figures: dict  # auc, ks, gini, brier, log_loss of the federated model on the test split
    comparison: Comparison
    tiers: dict
    default_rate_by_tier: dict
    people: dict
    round_trips: int
    aggregation_mode: str
    privacy: dict  # the accounting: epsilon(s), delta, accountant, noise, clip, steps
    audit: dict
    history: dict  # per epoch (vertical) or round (horizontal): "federated" and baselines'
    baselines: dict  # each baseline's test figures
    own: dict


def write_metrics(run: Run, outcome: Outcome, curves: dict) -> dict:
    """metrics.json (with curves.json and manifest.json) from the outcome; the run's total
    time is taken here, the last thing it measures."""
    seconds = run.timer.seconds
    seconds["total"] = round(time.perf_counter() - run.t0, 3)
    metrics = {
        **outcome.figures,
        **outcome.comparison.to_dict(),
        "tiers": outcome.tiers,
        "test_default_rate_by_tier": outcome.default_rate_by_tier,
        "seconds": seconds,
        "people": outcome.people,
        "round_trips": outcome.round_trips,
        "aggregation_mode": outcome.aggregation_mode,
        **outcome.privacy,
        "audit": outcome.audit,
        "history": outcome.history,
        "baselines": outcome.baselines,
        "data": run.cfg.data or "generated",
    }
    clash = sorted(metrics.keys() & outcome.own.keys())
    if clash:
        raise ValueError(f"a topology's own metrics reuse shared keys: {', '.join(clash)}")
    return write_results(run, {**metrics, **outcome.own}, curves)
