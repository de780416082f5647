"""The run's privacy plan: one accountant for the combined model, the caps, and the ledger.

What is released is the COMBINED model z = b + sum_k g_k (and every score, reason and metric
computed from it). All parties train on one shared Poisson batch; each clips its own
per-sample gradient block at c and adds Gaussian noise of std sigma * c from its own secret
stream. Stacked, that is one subsampled Gaussian mechanism on the joint gradient whose noise
multiplier, after whitening each block by its own noise, is

    sigma_joint = 1 / sqrt(sum_k 1 / sigma_k^2)  =  sigma / sqrt(K)  for K equal blocks,

so the per-party sigma is calibrated as sqrt(K) times the joint multiplier that meets the
target. privacy.max_grad_norm C bounds a person's gradient over the WHOLE model, as the central
DP model's clip does: each block clips at c = C / sqrt(K) (`block_clip`), so the joint sensitivity
is C and each party's noise std sigma * C / sqrt(K) = sigma_joint * C is the central model's.
(Clipping each block at C instead made the joint sensitivity sqrt(K) C: with 4 blocks every
party added twice the central noise, although the parties' gradients rarely reach C / 2;
bench/RESULTS.md "MLP defaults that hold on both data sizes".)

Before training, every party releases data-preparation statistics (each silo's
standardisation, the authority's prior) through a Gaussian mechanism with noise multiplier
STATISTICS_NOISE_MULTIPLIER; they are composed in the same accountant. After training the
authority fits its calibration on validation people, disjoint from training people by an
independent secret draw, with a Gaussian mechanism of its own: eps_model is the larger of the
two populations' compositions, each calibrated to the target.

delta: each silo's statistics release keeps a category value only past a threshold that a value
held by one person passes with probability THRESHOLD_DELTA, a delta outside the Gaussian
accounting. The plan reserves it out of the configured delta (`DeltaSplit`): the accountants
compose at what is left, and the combined model's delta (accountant + thresholds, `delta` in
metrics.json and on the ledger's model lines) never exceeds the configured one.

The authority mirrors every silo's accountant (same steps, same per-party sigma) and stops the
run if one disagrees. Epsilons are computed on a background thread so they overlap the next
round trip instead of adding to it.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from clients.protocol.accounting import (
    History,
    add_steps,
    affordable_steps,
    calibrate_sigma,
    epsilon,
)
from clients.protocol.dp_constants import (
    STATISTICS_NOISE_MULTIPLIER,
)
from server.config import ConfigError, PrivacyConfig
from server.delta_budget import DeltaSplit, releases_outside_sgd, split_delta
from server.dp_guardrails import (
    MAX_NOISE_MULTIPLIER,
    MAX_NOISE_PER_BATCH,
    Guardrail,
    Sampling,
    sampling_guardrails,
)
from server.federation import FederationError
from server.label_dp import flip_probability
from server.ledger import Ledger
from server.ledger_lines import (
    Block,
    GaussianRelease,
    JointRound,
    LabelRelease,
    LedgerLine,
    Refusal,
    TranscriptLine,
)

log = logging.getLogger(__name__)

AUTHORITY = "authority"
JOINT = "*"
# Noisy Newton steps of the DP calibration (server/scoring.py), each one Gaussian release.
CALIBRATION_STEPS = 3
PER_PARTY_NOTE = ("per-party figure: the epsilon of one party's DP-SGD steps alone; it bounds "
                  "no release (the scores come from the combined model)")


class PrivacyPlan:
    def __init__(
        self,
        cfg: PrivacyConfig,
        silos: tuple[str, ...],
        n_train: int,
        batch_size: int,
        epochs: int,
        ledger: Ledger | None,
        summaries: bool = False,
    ) -> None:
        """`summaries`: each silo will release a DP histogram of its contributions after
        training (the report's per-silo points), one more Gaussian release per silo."""
        self.cfg = cfg
        self.silos = silos
        self.parties = (*silos, AUTHORITY)
        self.blocks = len(self.parties)  # every silo's bottom model and the authority's head
        # The configured delta: the transcript budget's, and the guardrails'.
        self.delta = cfg.delta_for(n_train)
        self.sampling = Sampling(n_train=n_train, batch_size=batch_size, epochs=epochs)
        self.q = self.sampling.q
        self.steps_planned = self.sampling.steps
        self.expected_batch = self.sampling.expected_batch
        self.rho = flip_probability(cfg.label_epsilon)
        self.releases_outside_sgd = releases_outside_sgd(silos, summaries)
        # The combined model's delta: without DP-SGD it claims nothing, so nothing is reserved.
        self.deltas = (split_delta(self.delta, self.releases_outside_sgd) if cfg.dp_sgd
                       else DeltaSplit(self.delta, 0.0, self.delta))
        # Every epsilon of the model budget is composed at this delta.
        self.accountant_delta = self.deltas.accountant
        self.statistics: History = []
        for release in self.releases_outside_sgd:
            self.statistics = add_steps(self.statistics, release.noise_multiplier, 1.0, 1)
        self._silo_releases: History = []
        for release in self.releases_outside_sgd:
            if silos and release.party == silos[0]:
                self._silo_releases = add_steps(self._silo_releases, release.noise_multiplier,
                                                1.0, 1)
        self.sigma = 0.0  # per party
        # What each party clips its block at: the joint bound split evenly (module docstring).
        self.block_clip = cfg.max_grad_norm / math.sqrt(self.blocks)
        self.joint_sigma = 0.0
        self.calibration_sigma = 0.0
        self.max_steps = math.inf
        if cfg.dp_sgd:
            self._calibrate()
        self.history: History = list(self.statistics)  # the combined model's accountant
        self.party_history: History = []  # one party's DP-SGD steps (what silos report)
        self.calibration_history: History = []
        # eps_transcript: how often each person's contribution has left the silos, and how
        # often each person was in a batch. The authority picks who is sampled, so there is no
        # amplification against it: the worst-off person's counts are what compose.
        self.releases = np.zeros(0, dtype=np.int64)
        self.sampled = np.zeros(0, dtype=np.int64)
        self.spent = 0
        self.round_steps = 0
        self.ledger = ledger
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._pending: list[Future] = []
        log.info(
            "privacy: joint sigma %.4f (%.4f per party, %d blocks), q %.5f, %d steps planned, "
            "delta %.3e (%.3e accounted, %.1e for category thresholds), cap %s",
            self.joint_sigma, self.sigma, self.blocks, self.q, self.steps_planned,
            self.deltas.combined, self.deltas.accountant, self.deltas.reserved, cfg.budget_cap,
        )

    def _calibrate(self) -> None:
        """The joint noise for the planned steps, the steps the cap affords, and the
        calibration's noise on validation people."""
        cfg = self.cfg
        try:
            self.joint_sigma = calibrate_sigma(cfg.epsilon, self.accountant_delta, self.q,
                                               self.steps_planned, cfg.accountant,
                                               prefix=self.statistics)
        except ValueError as exc:
            raise ConfigError(f"privacy.epsilon={cfg.epsilon} is too small: {exc}; raise "
                              "it") from None
        self.sigma = self.joint_sigma * math.sqrt(self.blocks)
        self.max_steps = affordable_steps(
            cfg.accountant, self.statistics, self.joint_sigma, self.q, self.steps_planned,
            self.accountant_delta, cfg.budget_cap,
        )
        if self.max_steps == 0:
            one = epsilon(cfg.accountant, add_steps(self.statistics, self.joint_sigma, self.q, 1),
                          self.accountant_delta)
            raise ConfigError(
                f"privacy.cap={cfg.budget_cap} is below the cost of a single step "
                f"(epsilon {one:.3g} at joint noise {self.joint_sigma:.3g}, sample rate "
                f"{self.q:.3g}); raise the cap or privacy.epsilon"
            )
        # The cap covers every population: validation people too. (A cap the statistics
        # alone pass was refused just above: no step would be affordable.) A tune's selection
        # score on the same people comes after the run: room is left for it here.
        before = (add_steps(self.statistics, cfg.selection_noise, 1.0, 1)
                  if cfg.selection_noise else self.statistics)
        try:
            self.calibration_sigma = calibrate_sigma(
                min(cfg.epsilon, cfg.budget_cap), self.accountant_delta, 1.0,
                CALIBRATION_STEPS, cfg.accountant, prefix=before)
        except ValueError as exc:
            raise ConfigError(f"privacy.epsilon={cfg.epsilon} is too small for the validation "
                              f"people: {exc}; raise it (or privacy.selection_noise)") from None

    def guardrails(self) -> list[Guardrail]:
        """Why this plan may not learn (empty without DP-SGD): the sampling's reasons, and the
        noise the calibration chose. Logged and recorded by the run (server/run_plan.py
        `run_guardrails`, with every other model's); refusals are made before the engine
        (`sampling_guardrails` on an upper bound of the training people)."""
        if not self.cfg.dp_sgd:
            return []
        out = sampling_guardrails(self.sampling, self.delta)
        per_batch = self.sigma / self.expected_batch
        if self.joint_sigma > MAX_NOISE_MULTIPLIER or per_batch > MAX_NOISE_PER_BATCH:
            out.append(Guardrail(check="noise", level="warn", message=(
                f"noise multiplier {self.joint_sigma:.2f} joint ({self.sigma:.2f} per party): "
                f"each step's noise on the averaged gradient is {per_batch:.2f} of the clipping "
                f"bound over an expected batch of {self.expected_batch:,}; raise "
                "privacy.epsilon or train on more people (a larger batch lowers the noise per "
                "step but leaves fewer steps)")))
        return out

    # ---- planning ---------------------------------------------------------------------------

    def allow(self, steps: int) -> int:
        """How many of the next `steps` DP-SGD steps stay within the model cap."""
        if not self.cfg.dp_sgd:
            return steps
        return int(min(steps, self.max_steps - self.spent))

    def allow_releases(self, n_positions: int, *sent: np.ndarray | None) -> bool:
        """Whether releasing `sent` keeps every silo's transcript epsilon within its cap."""
        if not self.cfg.transcript_dp or not math.isfinite(self.cfg.transcript_cap):
            return True
        releases, sampled = self._counted(n_positions, *sent)
        eps = epsilon(self.cfg.accountant, self._transcript_history(releases, sampled),
                      self.accountant_delta, precise=False)
        return eps <= self.cfg.transcript_cap

    def spend(self, steps: int) -> None:
        self.spent += steps
        self.round_steps = steps
        if self.cfg.dp_sgd:
            self.history = add_steps(self.history, self.joint_sigma, self.q, steps)
            self.party_history = add_steps(self.party_history, self.sigma, self.q, steps)

    def refuse(self, steps: int, allowed: int, round_: int, budget: str = "model") -> None:
        """Record that `steps` steps (after `allowed` granted ones) were refused because they
        would pass a cap; a model line carries the epsilon they would have reached."""
        if budget == "model":
            after = add_steps(self.history, self.joint_sigma, self.q, allowed + steps)
            line = Refusal(party=JOINT, budget=budget, steps=steps, round=round_,
                           delta=self.deltas.combined, accountant=self.cfg.accountant,
                           epsilon=epsilon(self.cfg.accountant, after, self.accountant_delta),
                           cap=self.cfg.budget_cap, population="train")
        else:
            line = Refusal(party=JOINT, budget=budget, steps=steps, round=round_,
                           delta=self.delta, accountant=self.cfg.accountant, epsilon=None,
                           cap=self.cfg.transcript_cap)
        log.warning("privacy budget cap (%s) reached after %d steps: refusing %d more; "
                    "training stops here", budget, self.spent, steps)
        self._write_after_rounds(line)

    # ---- recording ----------------------------------------------------------------------------

    def record_start(self) -> None:
        """The mechanisms before training: each party's preparation statistics, label DP.

        Each line's (epsilon, delta) holds for everything released up to it: its delta is the
        accountant's plus the extra deltas so far (a silo's statistics line carries its own as
        `extra_delta`), so from the last silo's line on it is the combined delta."""
        history: History = []
        extra = 0.0
        # Without DP-SGD the model claims no epsilon, and its statistics need no line (the
        # prior is then exact; the silos' preparation stays noisy, it is theirs to keep).
        for release in self.releases_outside_sgd if self.cfg.dp_sgd else ():
            history = add_steps(history, release.noise_multiplier, 1.0, 1)
            extra += release.extra_delta
            self._write(GaussianRelease(
                party=release.party, population="all", purpose=release.purpose,
                noise_multiplier=release.noise_multiplier, sample_rate=1.0, steps=1, round=0,
                epsilon=epsilon(self.cfg.accountant, history, self.accountant_delta),
                delta=self.accountant_delta + extra, extra_delta=release.extra_delta or None,
                accountant=self.cfg.accountant,
            ))
        if self.cfg.label_dp:
            self._write(LabelRelease(party=AUTHORITY, epsilon_rr=self.cfg.label_epsilon,
                                     epsilon=self.cfg.label_epsilon))

    def record_round(self, round_: int, reported: dict[str, History], final: bool = False) -> None:
        """Check each silo's accountant against the plan and log the round's joint spend.

        Intermediate lines carry Opacus's default-precision bound (an upper bound within 0.01);
        the final round's line is computed to 0.5 %, as are the reported metrics."""
        if not self.cfg.dp_sgd:
            return
        mine = [tuple(h) for h in self.party_history]
        for silo, hist in reported.items():
            if [tuple(h) for h in hist] != mine:
                raise FederationError(
                    f"silo {silo!r} accounted {sum(h[2] for h in hist)} DP-SGD steps, the "
                    f"authority planned {self.spent}; its accountant is out of step"
                )
        steps, history = self.round_steps, list(self.history)
        self._pending.append(self._pool.submit(self._log_round, round_, steps, history, final))

    def _log_round(self, round_: int, steps: int, history: History, final: bool) -> None:
        self._write(JointRound(
            party=JOINT, population="train",
            blocks=tuple(Block(party=p, noise_multiplier=self.sigma,
                               clip=self.block_clip) for p in self.parties),
            noise_multiplier=self.joint_sigma, sample_rate=self.q, steps=steps, round=round_,
            epsilon=epsilon(self.cfg.accountant, history, self.accountant_delta,
                            precise=final),
            delta=self.deltas.combined, accountant=self.cfg.accountant,
        ))

    def record_calibration(self, round_: int) -> None:
        """The authority's DP calibration on validation people (server/scoring.py)."""
        if not self.cfg.dp_sgd:
            return
        self.calibration_history = add_steps(self.statistics, self.calibration_sigma, 1.0,
                                             CALIBRATION_STEPS)
        self._write_after_rounds(GaussianRelease(
            party=AUTHORITY, population="val", purpose="calibration",
            noise_multiplier=self.calibration_sigma, sample_rate=1.0, steps=CALIBRATION_STEPS,
            round=round_,
            epsilon=epsilon(self.cfg.accountant, self.calibration_history,
                            self.accountant_delta),
            delta=self.deltas.combined, accountant=self.cfg.accountant,
        ))

    def after_ledger(self, job) -> None:
        """Run `job` once every ledger line recorded so far is written (for checkpoints)."""
        self._pending.append(self._pool.submit(job))

    def restore(self, spent: int, round_steps: int, releases: np.ndarray | None = None,
                sampled: np.ndarray | None = None) -> None:
        self.spent, self.round_steps = 0, 0
        self.history, self.party_history = list(self.statistics), []
        self.spend(spent)
        self.round_steps = round_steps
        if releases is not None and len(releases):
            self.releases = releases.astype(np.int64)
        if sampled is not None and len(sampled):
            self.sampled = sampled.astype(np.int64)

    def _counted(self, n_positions: int, *sent: np.ndarray | None,
                 plan: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        releases = self.releases if len(self.releases) == n_positions \
            else np.zeros(n_positions, dtype=np.int64)
        sampled = self.sampled if len(self.sampled) == n_positions \
            else np.zeros(n_positions, dtype=np.int64)
        releases, sampled = releases.copy(), sampled.copy()
        for positions in sent:
            if positions is not None and len(positions):
                releases += np.bincount(positions, minlength=n_positions)
        if plan is not None and len(plan):
            sampled += np.bincount(plan, minlength=n_positions)
        return releases, sampled

    def _transcript_history(self, releases: np.ndarray, sampled: np.ndarray) -> History:
        """What the authority sees of one person from one silo, composed without
        amplification: the silo's own releases beside DP-SGD (its preparation statistics and,
        with summaries, its contribution summary), the noised contributions released for the
        worst-off person, and every DP-SGD step of the silo's model that person was in (the
        model channel: later contributions depend on it). Every silo's releases are alike, so
        one history holds for each."""
        history = list(self._silo_releases)
        history = add_steps(history, self.cfg.transcript_sigma, 1.0,
                            int(releases.max(initial=0)))
        return add_steps(history, self.sigma, 1.0, int(sampled.max(initial=0)))

    def record_releases(self, round_: int, n_positions: int, plan: np.ndarray | None,
                        *sent: np.ndarray | None) -> None:
        """Count the contributions a round released (plan and evaluation positions) and the
        people sampled into its batches; log the transcript budget's spend."""
        if not self.cfg.transcript_dp:
            return
        self.releases, self.sampled = self._counted(n_positions, plan, *sent, plan=plan)
        history = self._transcript_history(self.releases, self.sampled)
        self._pending.append(self._pool.submit(self._log_transcript, round_, history))

    def _log_transcript(self, round_: int, history: History) -> None:
        eps = self._transcript_epsilon(history)
        for silo in self.silos:
            self._write(TranscriptLine(
                party=silo, history=tuple(history), round=round_,
                steps=sum(h[2] for h in history), epsilon=eps, delta=self.accountant_delta,
                accountant=self.cfg.accountant, clip=self.cfg.transcript_clip,
            ))

    def _transcript_epsilon(self, history: History) -> float | None:
        if not self.cfg.dp_sgd:
            return None  # the model channel is not protected: no finite bound
        return epsilon(self.cfg.accountant, history, self.accountant_delta)

    def _write(self, line: LedgerLine) -> None:
        if self.ledger is not None:
            self.ledger.append(line)

    def _write_after_rounds(self, line: LedgerLine) -> None:
        # Round lines are written by the ledger thread (their epsilon takes a while); a line
        # recorded after them must queue behind them, or under load it overtakes them and the
        # ledger of one run differs from its reproduction by the order of two lines.
        self._pending.append(self._pool.submit(self._write, line))

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
        dp = self.cfg.dp_sgd
        kind, delta = self.cfg.accountant, self.accountant_delta
        train_eps = epsilon(kind, self.history, delta) if dp else None
        val_eps = (epsilon(kind, self.calibration_history, delta)
                   if dp and self.calibration_history else 0.0)
        per_party = epsilon(kind, self.party_history, delta) if dp else None
        transcript = (self._transcript_epsilon(self._transcript_history(self.releases,
                                                                        self.sampled))
                      if self.cfg.transcript_dp else None)
        return {
            "epsilon": {
                # The headline: the combined released model, for every person (training people
                # through DP-SGD, validation people through the calibration).
                "model": max(train_eps, val_eps or 0.0) if train_eps is not None else None,
                "model_by_population": {"train": train_eps, "val": val_eps} if dp else None,
                "model_per_party": {"note": PER_PARTY_NOTE,
                                    **dict.fromkeys(self.parties, per_party)} if dp else None,
                "label": self.cfg.label_epsilon if self.cfg.label_dp else None,
                "transcript": dict.fromkeys(self.silos, transcript) if self.cfg.transcript_dp
                else None,
            },
            # The combined model's delta (the other budgets' is the configured one, at least
            # as large): the accountant's, at which every model epsilon is composed, plus the
            # silos' category thresholds reserved out of the configured delta.
            "delta": self.deltas.combined,
            "delta_accountant": self.deltas.accountant,
            "delta_thresholds": self.deltas.reserved,
            "accountant": self.cfg.accountant,
            "noise_multiplier": self.sigma,
            "joint_noise_multiplier": self.joint_sigma,
            "blocks": self.blocks,
            "statistics_noise_multiplier": STATISTICS_NOISE_MULTIPLIER,
            "calibration_noise_multiplier": self.calibration_sigma,
            "sample_rate": self.q,
            # Each party's clip (as noise_multiplier is each party's), and the joint bound
            # (as joint_noise_multiplier), which the central DP baseline clips at.
            "max_grad_norm": self.block_clip,
            "joint_max_grad_norm": self.cfg.max_grad_norm,
            "steps": self.spent,
            "steps_planned": self.steps_planned,
            "label_flip_probability": self.rho,
            "transcript_releases_max": int(self.releases.max(initial=0)),
            "transcript_sampled_max": int(self.sampled.max(initial=0)),
        }


def model_epsilon(metrics: dict) -> float | None:
    """The headline eps_model of a run's metrics: the combined model's (vertical), or the
    largest region's (horizontal, a dict per region); None without DP."""
    value = (metrics.get("epsilon") or {}).get("model")
    if isinstance(value, dict):
        spent = [v for k, v in value.items() if k != "note" and v is not None]
        return max(spent) if spent else None
    return value
