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
    """One check per (party, budget): the last cumulative epsilon against a recomputation from
    every line's steps."""
    checks = []
    for (party, budget), entries in ledger.budgets(ledger.read(run_dir)):
        spent = [e for e in entries if e.get("event") != "refused"]
        if not spent:
            continue
        last = spent[-1]
        if last["mechanism"] == "randomized_response":
            checks.append(Check(party, budget, "pure", 1, last["epsilon"], last["epsilon_rr"]))
            continue
        history: list[tuple[float, float, int]] = []
        for e in spent:
            sigma, q = e["noise_multiplier"], e["sample_rate"]
            if history and history[-1][:2] == (sigma, q):
                history[-1] = (sigma, q, history[-1][2] + e["steps"])
            else:
                history.append((sigma, q, e["steps"]))
        kind = last["accountant"]
        checks.append(
            Check(party, budget, kind, sum(h[2] for h in history), last["epsilon"],
                  independent_epsilon(history, last["delta"], kind))
        )
    return checks
