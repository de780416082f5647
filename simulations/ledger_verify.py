"""Re-check a run's privacy ledger with an independent accountant (Google's dp-accounting).

Opacus's RDP accountant is compared with dp-accounting's RDP accountant (tolerance 1 %), and
Opacus's PRV accountant with dp-accounting's privacy-loss-distribution accountant (2 %): the
same composition of Poisson-subsampled Gaussian steps, computed by different code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dp_accounting as dpa
from dp_accounting import pld, rdp

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
        history: list[tuple[float, float, int]] = []
        for e in mine:
            sigma = (joint_multiplier([b["noise_multiplier"] for b in e["blocks"]])
                     if "blocks" in e else e["noise_multiplier"])
            _add(history, sigma, e["sample_rate"], e["steps"])
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


def _add(history: list[tuple[float, float, int]], sigma: float, q: float, steps: int) -> None:
    if history and history[-1][:2] == (sigma, q):
        history[-1] = (sigma, q, history[-1][2] + steps)
    else:
        history.append((sigma, q, steps))
