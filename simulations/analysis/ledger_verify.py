"""Re-check a run's privacy ledger with an independent accountant (Google's dp-accounting).

Opacus's RDP accountant is compared with dp-accounting's RDP accountant (tolerance 1 %), and
Opacus's PRV accountant with dp-accounting's privacy-loss-distribution accountant (2 %): the
same composition of Poisson-subsampled Gaussian steps, computed by different code. The
composition is made of the lines' own events (`dp_event()` of server/ledger_lines.py), so
nothing here re-derives a mechanism from a line's fields.

Agreeing accountants are not enough: a ledger that recorded rounds twice (two resumed runs on
one directory) was re-computed consistently, epsilon above its target, and passed. So
`consistency` also checks the ledger as a record: sequence numbers without gaps or repeats, no
step recorded twice, the DP-SGD steps it holds equal to the steps the run itself reports
(metrics.json / authority.json), rounds strictly increasing; and every epsilon, the ledger's
at or below the run's target (privacy.cap, else privacy.epsilon), and the independent one
within the accountants' tolerance of it.

delta: a line's delta is its accountant's plus the extra deltas of the lines it composes (a
silo's category thresholds, `extra_delta`); the independent accountant composes at the
difference, and the combined delta must not exceed the run's own (metrics.json `delta`).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import dp_accounting as dpa
from dp_accounting import pld, rdp

from server import ledger, ledger_lines
from server.ledger import LedgerError
from server.ledger_lines import (
    JointRound,
    LedgerLine,
    ModelLine,
    Refusal,
    budget_event,
    budget_extra_delta,
)

TOLERANCE = {"rdp": 0.01, "prv": 0.02}


def independent_epsilon(event: dpa.DpEvent, delta: float, kind: str) -> float:
    """Epsilon of a composition by dp-accounting: RDP for Opacus's RDP, PLD for its PRV, and
    for pure mechanisms (randomised response) the sum of their epsilons."""
    if kind == "pure":
        return pure_epsilon(event)
    if kind == "rdp":
        acc = rdp.RdpAccountant()
    elif kind == "prv":
        acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    else:
        raise ValueError(f"no independent accountant for {kind!r}")
    return float(acc.compose(event).get_epsilon(delta))


def pure_epsilon(event: dpa.DpEvent) -> float:
    """The pure-DP epsilon of a composition of randomised responses. k-ary randomised response
    with noise parameter p keeps the input with probability 1 - p + p/k and gives any other
    bucket with p/k: epsilon = ln(1 + k (1 - p) / p)."""
    if isinstance(event, dpa.RandomizedResponseDpEvent):
        p, k = event.noise_parameter, event.num_buckets
        return math.inf if p == 0 else math.log1p(k * (1 - p) / p)
    if isinstance(event, dpa.SelfComposedDpEvent):
        return event.count * pure_epsilon(event.event)
    if isinstance(event, dpa.ComposedDpEvent):
        return sum(pure_epsilon(e) for e in event.events)
    if isinstance(event, dpa.NoOpDpEvent):
        return 0.0
    raise ValueError(f"{type(event).__name__} has no pure epsilon")


def event_steps(event: dpa.DpEvent) -> int:
    """How many mechanisms a composition holds (a subsampled step counts once)."""
    if isinstance(event, dpa.SelfComposedDpEvent):
        return event.count * event_steps(event.event)
    if isinstance(event, dpa.ComposedDpEvent):
        return sum(event_steps(e) for e in event.events)
    if isinstance(event, dpa.PoissonSampledDpEvent):
        return event_steps(event.event)
    return 0 if isinstance(event, dpa.NoOpDpEvent) else 1


@dataclass
class Check:
    party: str
    budget: str
    accountant: str
    steps: int
    reported: float
    independent: float
    # The delta of the reported epsilon (the last line's), and what of it the lines add outside
    # the composition (category thresholds): dp-accounting composes at the difference.
    delta: float = 0.0
    extra_delta: float = 0.0

    @property
    def relative_gap(self) -> float:
        return abs(self.reported - self.independent) / max(self.independent, 1e-12)

    @property
    def ok(self) -> bool:
        if self.accountant == "pure":
            # Both sides are ln of the same odds, one through the flip probability: equal but
            # for the last bits.
            return math.isclose(self.reported, self.independent, rel_tol=1e-9)
        return self.relative_gap <= TOLERANCE[self.accountant]


def _check(party: str, budget: str, lines: list[LedgerLine]) -> Check:
    """The last line's cumulative epsilon against dp-accounting's for every line's event."""
    event, last, extra = budget_event(lines), lines[-1], budget_extra_delta(lines)
    assert last.epsilon is not None
    if extra and not extra < last.delta:
        raise LedgerError(f"{party} {budget}: the lines' extra delta {extra:.3g} is not below "
                          f"the last line's delta {last.delta:.3g}: the ledger claims less "
                          "delta than its mechanisms spend")
    return Check(party, budget, last.accountant, event_steps(event), last.epsilon,
                 independent_epsilon(event, last.delta - extra, last.accountant),
                 delta=last.delta, extra_delta=extra)


def verify(run_dir: Path) -> list[Check]:
    """One check per budget: the last cumulative epsilon against a recomputation from every
    line's mechanism (`LedgerLine.dp_event`).

    eps_model is checked per population: training people (each party's preparation statistics,
    the authority's prior, then the joint DP-SGD steps) and validation people (the same
    statistics, then the calibration). A joint line's noise multiplier is recomputed from its
    blocks, 1 / sqrt(sum_k 1 / sigma_k^2), not read from the line. The silos' statistics lines'
    `extra_delta` (category thresholds) is part of both populations' delta."""
    lines = [x for x in ledger_lines.read(run_dir) if not isinstance(x, Refusal)]
    checks = []
    model = [x for x in lines if isinstance(x, ModelLine) and x.budget == "model"]
    # Populations are disjoint sets of people: training and validation people of a vertical
    # run, each region's customers of a horizontal one ("all" lines touch everyone).
    for population in sorted({x.population for x in model} - {"all"}):
        mine: list[LedgerLine] = [x for x in model if x.population in ("all", population)]
        party = "combined model" if population in ("train", "val") else population
        checks.append(_check(party, f"model/{population}", mine))
    budgets: dict[tuple[str, str], list[LedgerLine]] = {}
    for x in lines:
        if not (isinstance(x, ModelLine) and x.budget == "model"):
            budgets.setdefault((x.party, x.budget), []).append(x)
    for (party, budget), mine in budgets.items():
        if mine[-1].epsilon is None:
            continue  # no finite bound was claimed (transcript without DP-SGD)
        checks.append(_check(party, budget, mine))
    return checks


# Floating-point slack only: a calibrated run's epsilon sits at or below its target; a step
# counted twice pushes it above by far more than this.
TARGET_SLACK = 1e-9
# Relative: a delta is a sum of a few floating-point terms.
DELTA_SLACK = 1e-12
JOINT = JointRound.mechanism


def consistency(run_dir: Path, checks: list[Check] | None = None) -> list[str]:
    """What is wrong with the ledger as the run's record (empty when nothing): each problem a
    sentence naming the line or budget and what to do."""
    entries = ledger.read(run_dir)
    problems: list[str] = []
    seqs = [e.get(ledger.SEQ) for e in entries]
    if any(q is not None for q in seqs):
        for i, q in enumerate(seqs):
            if q != i:
                what = ("is missing its sequence number" if q is None
                        else f"carries sequence number {q}")
                problems.append(f"line {i + 1} {what}, expected {i}: lines were deleted, "
                                "repeated or reordered")
                break
    for first, again in ledger.duplicates(entries):
        e = entries[again]
        problems.append(f"line {again + 1} repeats line {first + 1} (party {e['party']!r}, "
                        f"budget {e['budget']!r}, round {e['round']}): a step counted twice")
    joint = [e for e in entries if e.get("mechanism") == JOINT and e.get("event") != "refused"]
    rounds = [int(e["round"]) for e in joint]
    if any(b <= a for a, b in itertools.pairwise(rounds)):
        problems.append(f"DP-SGD rounds are not strictly increasing ({_short(rounds)}): a "
                        "round was recorded twice or out of order")
    record = _run_record(Path(run_dir))
    if record is not None and joint:
        trained = record.get("training_steps")
        counted = sum(int(e["steps"]) for e in joint)
        if trained is not None and int(trained) != counted:
            problems.append(f"the ledger holds {counted} DP-SGD steps, the run trained "
                            f"{int(trained)} (its metrics): steps were "
                            f"{'counted twice' if counted > int(trained) else 'lost'}")
        trips = record.get("round_trips")
        if trips is not None and rounds and max(rounds) > int(trips):
            problems.append(f"the ledger records round {max(rounds)}, the run had "
                            f"{int(trips)} rounds")
    if checks is None:
        checks = verify(run_dir)
    if record is not None and record.get("delta") is not None:
        problems += _deltas_above(checks, float(record["delta"]))
    targets = _targets(Path(run_dir))
    for c in checks:
        target = targets.get("model" if c.budget.startswith("model/") else c.budget)
        if target is None or not math.isfinite(target):
            continue
        # The run's own accountant stopped it at the target, so its figure must be within it;
        # the independent one may differ from it by the accountants' tolerance, no more (a
        # ledger with steps counted twice exceeds both).
        allowed = {"ledger": target + TARGET_SLACK,
                   "dp-accounting": target * (1 + TOLERANCE.get(c.accountant, 0.0)) + TARGET_SLACK}
        if c.reported > allowed["ledger"] or c.independent > allowed["dp-accounting"]:
            worst = max(c.reported, c.independent)
            problems.append(f"{c.party} {c.budget}: epsilon {worst:.4f} (ledger "
                            f"{c.reported:.4f}, dp-accounting {c.independent:.4f}) is above "
                            f"the run's target {target:g}")
    return problems


def _deltas_above(checks: list[Check], reported: float) -> list[str]:
    """A budget whose lines add an extra delta claims accountant + extra: at most the delta
    the run reports, of which the extra was reserved (server/delta_budget.py `DeltaSplit`)."""
    return [f"{c.party} {c.budget}: delta {c.delta:.6g} (of which {c.extra_delta:.3g} for "
            f"category thresholds) is above the run's delta {reported:.6g}: the extra delta "
            "was not reserved out of the run's"
            for c in checks if c.extra_delta and c.delta > reported * (1 + DELTA_SLACK)]


def _run_record(run_dir: Path) -> dict | None:
    """What the run reports it trained: metrics.json, else authority.json (a run stopped after
    training), else nothing (a run still training: its checkpoint is the authority's)."""
    for name in ("metrics.json", "authority.json"):
        path = run_dir / name
        if path.exists():
            return json.loads(path.read_text())
    return None


def _targets(run_dir: Path) -> dict[str, float]:
    """The epsilon each budget must stay within, from the run's config.json."""
    path = run_dir / "config.json"
    if not path.exists():
        return {}
    cfg = json.loads(path.read_text())
    out: dict[str, float] = {}
    eps = cfg.get("privacy.epsilon")
    if eps is not None and cfg.get("topology", "vertical") != "horizontal":
        cap = cfg.get("privacy.cap") or 0.0
        out["model"] = float(cap or eps)
    if cfg.get("privacy.label_dp", True) and cfg.get("privacy.label_epsilon") is not None:
        out["label"] = float(cfg["privacy.label_epsilon"])
    if cfg.get("privacy.transcript_cap") is not None:
        out["transcript"] = float(cfg["privacy.transcript_cap"])
    return out


def _short(values: list[int]) -> str:
    return ", ".join(map(str, values[:12])) + (", ..." if len(values) > 12 else "")
