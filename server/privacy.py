"""The run's privacy plan: calibrated noise, the budget cap, and the ledger.

Every party takes the same DP-SGD steps (same noise multiplier, sample rate and count), so the
authority keeps a mirror of the accountant history and checks each silo's own accountant
against it every round: a silo that accounted differently stops the run. Epsilons are computed
on a background thread so they overlap the next round trip instead of adding to it.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from clients.accounting import History, add_steps, affordable_steps, calibrate_sigma, epsilon
from server.config import ConfigError, PrivacyConfig
from server.federation import FederationError
from server.label_dp import flip_probability
from server.ledger import Ledger

log = logging.getLogger(__name__)

AUTHORITY = "authority"


class PrivacyPlan:
    def __init__(
        self,
        cfg: PrivacyConfig,
        silos: tuple[str, ...],
        n_train: int,
        batch_size: int,
        epochs: int,
        ledger: Ledger | None,
    ) -> None:
        self.cfg = cfg
        self.silos = silos
        self.parties = (*silos, AUTHORITY)
        self.delta = cfg.delta_for(n_train)
        self.q = min(1.0, batch_size / n_train)
        self.steps_planned = epochs * max(1, round(1 / self.q))
        self.expected_batch = max(1, round(self.q * n_train))
        self.rho = flip_probability(cfg.label_epsilon)
        self.sigma = 0.0
        self.max_steps = math.inf
        if cfg.dp_sgd:
            self.sigma = calibrate_sigma(
                cfg.epsilon, self.delta, self.q, self.steps_planned, cfg.accountant
            )
            self.max_steps = affordable_steps(
                cfg.accountant, [], self.sigma, self.q, self.steps_planned, self.delta,
                cfg.budget_cap,
            )
            if self.max_steps == 0:
                one = epsilon(cfg.accountant, [(self.sigma, self.q, 1)], self.delta)
                raise ConfigError(
                    f"privacy.cap={cfg.budget_cap} is below the cost of a single step "
                    f"(epsilon {one:.3g} at noise {self.sigma:.3g}, sample rate {self.q:.3g}); "
                    "raise the cap or privacy.epsilon"
                )
        self.history: History = []
        # eps_transcript: how often each person's contribution has left the silos. The
        # authority picks who is sampled, so there is no amplification: the worst-off person's
        # count of Gaussian releases is what composes.
        self.releases = np.zeros(0, dtype=np.int64)
        self.transcript_history: History = []
        self.spent = 0
        self.round_steps = 0
        self.ledger = ledger
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._pending: list[Future] = []
        log.info(
            "privacy: sigma %.4f, q %.5f, %d steps planned, delta %.2e, cap %s",
            self.sigma, self.q, self.steps_planned, self.delta, cfg.budget_cap,
        )

    # ---- planning ---------------------------------------------------------------------------

    def allow(self, steps: int) -> int:
        """How many of the next `steps` DP-SGD steps stay within every party's cap."""
        if not self.cfg.dp_sgd:
            return steps
        return int(min(steps, self.max_steps - self.spent))

    def spend(self, steps: int) -> None:
        self.spent += steps
        self.round_steps = steps
        if self.cfg.dp_sgd:
            self.history = add_steps(self.history, self.sigma, self.q, steps)

    def refuse(self, steps: int, allowed: int, round_: int) -> None:
        """Record that `steps` steps (after `allowed` granted ones) were refused because they
        would pass the cap; the line carries the epsilon they would have reached."""
        after = add_steps(self.history, self.sigma, self.q, allowed + steps)
        would_be = epsilon(self.cfg.accountant, after, self.delta)
        log.warning(
            "privacy budget cap %.3g reached after %d steps: refusing %d more (epsilon would "
            "be %.3g); training stops here", self.cfg.budget_cap, self.spent, steps, would_be,
        )
        self._write(
            party="*", budget="model", mechanism="poisson_gaussian", event="refused",
            noise_multiplier=self.sigma, sample_rate=self.q, steps=steps, round=round_,
            epsilon=would_be, delta=self.delta, accountant=self.cfg.accountant,
            cap=self.cfg.budget_cap,
        )

    # ---- recording ----------------------------------------------------------------------------

    def record_labels(self) -> None:
        if self.cfg.label_dp:
            self._write(
                party=AUTHORITY, budget="label", mechanism="randomized_response",
                epsilon_rr=self.cfg.label_epsilon, steps=1, round=0,
                epsilon=self.cfg.label_epsilon, delta=0.0, accountant="pure",
            )

    def record_round(self, round_: int, reported: dict[str, History], final: bool = False) -> None:
        """Check each silo's accountant against the plan and log the round's spend.

        Intermediate lines carry Opacus's default-precision bound (an upper bound within 0.01);
        the final round's line is computed to 0.5 %, as are the reported metrics."""
        if not self.cfg.dp_sgd:
            return
        mine = [tuple(h) for h in self.history]
        for silo, hist in reported.items():
            if [tuple(h) for h in hist] != mine:
                raise FederationError(
                    f"silo {silo!r} accounted {sum(h[2] for h in hist)} DP-SGD steps, the "
                    f"authority planned {self.spent}; its accountant is out of step"
                )
        steps, history = self.round_steps, list(mine)
        self._pending.append(self._pool.submit(self._log_round, round_, steps, history, final))

    def _log_round(self, round_: int, steps: int, history: History, final: bool) -> None:
        eps = epsilon(self.cfg.accountant, history, self.delta, precise=final)
        for party in self.parties:
            self._write(
                party=party, budget="model", mechanism="poisson_gaussian",
                noise_multiplier=self.sigma, sample_rate=self.q, steps=steps, round=round_,
                epsilon=eps, delta=self.delta, accountant=self.cfg.accountant,
            )

    def after_ledger(self, job) -> None:
        """Run `job` once every ledger line recorded so far is written (for checkpoints)."""
        self._pending.append(self._pool.submit(job))

    def restore(self, history: History, spent: int, round_steps: int,
                releases: np.ndarray | None = None) -> None:
        self.history = [tuple(h) for h in history]
        self.spent, self.round_steps = spent, round_steps
        if releases is not None and len(releases):
            self.releases = releases.astype(np.int64)
            worst = int(self.releases.max())
            self.transcript_history = add_steps([], self.cfg.transcript_sigma, 1.0, worst)

    def record_releases(self, round_: int, n_positions: int, *sent: np.ndarray | None) -> None:
        """Count the contributions a round released; log the transcript budget's spend."""
        if not self.cfg.transcript_dp:
            return
        if len(self.releases) != n_positions:
            self.releases = np.zeros(n_positions, dtype=np.int64)
        before = int(self.releases.max(initial=0))
        for positions in sent:
            if positions is not None and len(positions):
                self.releases += np.bincount(positions, minlength=n_positions)
        added = int(self.releases.max(initial=0)) - before
        if added == 0:
            return
        self.transcript_history = add_steps(
            self.transcript_history, self.cfg.transcript_sigma, 1.0, added
        )
        history = list(self.transcript_history)
        self._pending.append(self._pool.submit(self._log_transcript, round_, added, history))

    def _log_transcript(self, round_: int, steps: int, history: History) -> None:
        eps = epsilon(self.cfg.accountant, history, self.delta)
        for silo in self.silos:
            self._write(
                party=silo, budget="transcript", mechanism="gaussian",
                noise_multiplier=self.cfg.transcript_sigma, sample_rate=1.0, steps=steps,
                round=round_, epsilon=eps, delta=self.delta, accountant=self.cfg.accountant,
                clip=self.cfg.transcript_clip,
            )

    def _write(self, **entry: object) -> None:
        if self.ledger is not None:
            self.ledger.append(**entry)

    def flush(self) -> None:
        """Wait until every round's epsilon is computed and in the ledger."""
        for job in self._pending:
            job.result()
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._pool.shutdown()

    # ---- reporting ----------------------------------------------------------------------------

    def summary(self) -> dict:
        self.flush()
        model_eps = (
            epsilon(self.cfg.accountant, self.history, self.delta) if self.cfg.dp_sgd else None
        )
        transcript_eps = (
            epsilon(self.cfg.accountant, self.transcript_history, self.delta)
            if self.cfg.transcript_dp else None
        )
        return {
            "epsilon": {
                "model": dict.fromkeys(self.parties, model_eps),
                "label": self.cfg.label_epsilon if self.cfg.label_dp else None,
                "transcript": dict.fromkeys(self.silos, transcript_eps),
            },
            "delta": self.delta,
            "accountant": self.cfg.accountant,
            "noise_multiplier": self.sigma,
            "sample_rate": self.q,
            "max_grad_norm": self.cfg.max_grad_norm,
            "steps": self.spent,
            "steps_planned": self.steps_planned,
            "label_flip_probability": self.rho,
            "transcript_releases_max": int(self.releases.max(initial=0)),
        }
