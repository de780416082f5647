"""Re-check a run's privacy ledger with an independent accountant (Google's dp-accounting).

Opacus's RDP accountant is compared with dp-accounting's RDP accountant (tolerance 1 %), and
Opacus's PRV accountant with dp-accounting's privacy-loss-distribution accountant (2 %): the
same composition of Poisson-subsampled Gaussian steps, computed by different code.

Agreeing accountants are not enough: a ledger that recorded rounds twice (two resumed runs on
one directory) was re-computed consistently, epsilon above its target, and passed. So
`consistency` also checks the ledger as a record: sequence numbers without gaps or repeats, no
step recorded twice, the DP-SGD steps it holds equal to the steps the run itself reports
(metrics.json / authority.json), rounds strictly increasing; and every epsilon, the ledger's
at or below the run's target (privacy.cap, else privacy.epsilon), and the independent one
within the accountants' tolerance of it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import dp_accounting as dpa
from dp_accounting import pld, rdp

from clients.protocol.accounting import History, add_steps
from server import ledger
from server.privacy import joint_multiplier

TOLERANCE = {"rdp": 0.01, "prv": 0.02}


def _event(history: list[tuple[float, float, int]]) -> dpa.DpEvent:
    def one(sigma: float, q: float) -> dpa.DpEvent:
        gaussian = dpa.GaussianDpEvent(sigma)
        # q = 1: every release of a person's contribution, no sampling (the transcript budget)
        return gaussian if q >= 1.0 else dpa.PoissonSampledDpEvent(q, gaussian)

    return dpa.ComposedDpEvent(
        [dpa.SelfComposedDpEvent(one(sigma, q), int(steps)) for sigma, q, steps in history
         if steps > 0]
    )


def independent_epsilon(history: list[tuple[float, float, int]], delta: float, kind: str) -> float:
    """Epsilon of Poisson-subsampled Gaussian steps by dp-accounting (RDP, or PLD for PRV)."""
    if kind == "rdp":
        acc = rdp.RdpAccountant()
    elif kind == "prv":
        acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    else:
        raise ValueError(f"no independent accountant for {kind!r}")
    return float(acc.compose(_event(history)).get_epsilon(delta))


@dataclass
class Check:
    party: str
    budget: str
    accountant: str
    steps: int
    reported: float
    independent: float

    @property
    def relative_gap(self) -> float:
        return abs(self.reported - self.independent) / max(self.independent, 1e-12)

    @property
    def ok(self) -> bool:
        if self.accountant == "pure":
            return self.reported == self.independent
        return self.relative_gap <= TOLERANCE[self.accountant]


def verify(run_dir: Path) -> list[Check]:
    """One check per budget: the last cumulative epsilon against a recomputation from every
    line's mechanism.

    eps_model is checked per population: training people (each party's preparation statistics,
    the authority's prior, then the joint DP-SGD steps) and validation people (the same
    statistics, then the calibration). A joint line's noise multiplier is recomputed from its
    blocks, 1 / sqrt(sum_k 1 / sigma_k^2), not read from the line."""
    entries = [e for e in ledger.read(run_dir) if e.get("event") != "refused"]
    checks = []
    model = [e for e in entries if e["budget"] == "model"]
    # Populations are disjoint sets of people: training and validation people of a vertical
    # run, each region's customers of a horizontal one ("all" lines touch everyone).
    for population in sorted({e.get("population", "train") for e in model} - {"all"}):
        mine = [e for e in model if e.get("population", "train") in ("all", population)]
        if not any(e.get("population", "train") == population for e in mine):
            continue
        history: History = []
        for e in mine:
            sigma = (joint_multiplier([b["noise_multiplier"] for b in e["blocks"]])
                     if "blocks" in e else e["noise_multiplier"])
            history = add_steps(history, sigma, e["sample_rate"], e["steps"])
        last = mine[-1]
        kind = last["accountant"]
        party = "combined model" if population in ("train", "val") else population
        checks.append(Check(party, f"model/{population}", kind,
                            sum(h[2] for h in history), last["epsilon"],
                            independent_epsilon(history, last["delta"], kind)))
    for (party, budget), lines in ledger.budgets([e for e in entries
                                                  if e["budget"] != "model"]):
        last = lines[-1]
        if last["mechanism"] == "randomized_response":
            checks.append(Check(party, budget, "pure", 1, last["epsilon"], last["epsilon_rr"]))
            continue
        if last.get("epsilon") is None:
            continue  # no finite bound was claimed (transcript without DP-SGD)
        history = [(float(s), float(q), int(n)) for s, q, n in last["history"]]
        kind = last["accountant"]
        checks.append(Check(party, budget, kind, sum(h[2] for h in history), last["epsilon"],
                            independent_epsilon(history, last["delta"], kind)))
    return checks


# Floating-point slack only: a calibrated run's epsilon sits at or below its target; a step
# counted twice pushes it above by far more than this.
TARGET_SLACK = 1e-9
JOINT = "joint_poisson_gaussian"


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
    targets = _targets(Path(run_dir))
    for c in checks if checks is not None else verify(run_dir):
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
