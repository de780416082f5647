"""metrics.json, one implementation for both topologies.

Each topology (experiment.py vertical, horizontal.py) measures its own way and fills an
`Outcome`; the parts every run directory shares (the test figures, the comparison with the
baselines and the oracle, timings, the privacy summary, audit, history, data description and
manifest) are laid out here once, so a key means one figure, under one name, in every run.

Populations (docs/architecture.md, "Metrics: one population per figure"): `auc`, `ks`,
`gini`, `brier` and `log_loss` are the score's figures on the people it serves, the scored
(eligible) test people; `all_test_<figure>` are the model's on every test person, the
ineligible included. The oracle, the baselines and the gaps to them see no opening
conditions, so they are all-test figures and the gaps are taken from `all_test_auc`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.metrics import ALL_TEST, FIGURES
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
    """What the federated model is measured by, on every test person: the oracle (the true
    probabilities; None on real data), the central model with and without DP, and the best
    single party alone (a silo, or a region)."""

    oracle: float | None
    central: float
    central_dp: float | None
    best: str
    best_auc: float
    # A credit analyst's central references (simulations/analysis/references.py) by name;
    # None for one a run resumed from an older version's saved baselines lacks.
    references: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self, all_test_auc: float) -> dict:
        """The comparison's keys, with the gaps from the federated model's AUC on the same
        population (every test person)."""
        return {
            "oracle_auc": self.oracle,
            "baseline_central_auc": self.central,
            "baseline_central_dp_auc": self.central_dp,
            **{f"baseline_{name}_auc": value for name, value in self.references.items()},
            "baseline_best_silo_auc": self.best_auc,
            "baseline_best_silo": self.best,
            "gap_to_oracle": self.oracle - all_test_auc if self.oracle is not None else None,
            "gap_to_central": self.central - all_test_auc,
        }


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What a finished run measured, as both topologies report it; `own` holds the keys only
    one topology writes (it may not reuse a shared key: one key per figure)."""

    # FIGURES of the federated model on the scored test people (None for a population of one
    # class) and on every test person.
    figures: Mapping[str, float | None]
    all_test_figures: Mapping[str, float]
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
        **{k: outcome.figures.get(k) for k in FIGURES},
        **{ALL_TEST + k: outcome.all_test_figures[k] for k in FIGURES},
        **outcome.comparison.to_dict(outcome.all_test_figures["auc"]),
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
