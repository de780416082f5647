"""One run of the scoring authority, start to finish.

connect -> PSI alignment -> split -> federated training -> calibration -> scores -> outputs,
one function per phase (`_connect`, `_resume` or `align_and_split`, `plan_training`,
`_train_and_calibrate`, `score_everyone`, `results` and `write_results`), each taking what the
phases before it produced (server/run_context.py: `Tables`, `RunState`, `Plan`, `Trained`,
`Scored`): which inputs a phase reads is in its signature, not in a closure over a long
function's locals. What is fixed before training is in server/run_plan.py, what the run
writes in server/run_results.py; training and calibration are here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from clients.protocol import messages as m
from clients.protocol.schema import AUTHORITY, authority_schema
from crypto.at_rest import open_keystore
from crypto.secret_random import SecretRandom
from server import checkpoint, gbdt_dp_notes, gbdt_dp_run, run_phases, scorecard_dp_run, scoring
from server.checkpoint import RunState, TrainState
from server.config import AuthorityConfig
from server.config_keys import to_flat
from server.federation import Federation
from server.gbdt_run import TreeJob
from server.labels import load_authority
from server.ledger import Ledger
from server.privacy import CALIBRATION_STEPS, PrivacyPlan
from server.run_context import Plan, RunContext, Tables, Trained
from server.run_keys import authority_random
from server.run_plan import align_and_split, plan_training
from server.run_results import results, score_everyone, write_results
from server.training import TrainJob, train

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict
    seconds: dict[str, float] = field(default_factory=dict)


def run_authority(
    fed: Federation,
    cfg: AuthorityConfig,
    data_dir: Path,
    out_dir: Path,
    progress: Callable[..., None] | None = None,
    resume: bool = False,
    psi_cache: dict | None = None,
) -> RunResult:
    """Run (or, with `resume`, continue from its checkpoint) the authority's side of a run.

    `psi_cache` (a dict kept across runs of one federation session on unchanged tables) lets
    later runs reuse the first run's private intersections instead of repeating PSI.

    Each phase is a function of its own. Their order is the order of the run's secret draws
    and ledger lines, which a rerun from the same keystore repeats bit for bit; the timer's
    names (connect, psi, train, score) are authority.json's `seconds`."""
    phases = run_phases.PhaseTimer(progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = to_flat(cfg)
    ledger = Ledger(out_dir)
    store = open_keystore(cfg.storage.keystore, data_dir)
    ctx = RunContext(fed, cfg, config, data_dir, out_dir, ledger, store,
                     authority_random(store, data_dir))

    phases.start("connect")
    tables = _connect(ctx)
    if resume:
        run, state = _resume(ctx)
    else:
        phases.start("psi")  # the DP trees draw no RR nor prior of the run's (sgd_config)
        run, state = align_and_split(fed, gbdt_dp_run.sgd_config(cfg), tables.ids,
                                     tables.labels, config, ctx.random, psi_cache,
                                     authority_schema(data_dir / AUTHORITY).id_format), None
    plan = plan_training(ctx, tables, run, state)
    phases.start("train")
    trained = _train_and_calibrate(ctx, plan, phases, progress)
    scored = score_everyone(ctx, tables, plan, trained)
    phases.stop()
    out = results(ctx, tables, plan, trained, scored, resume, phases.seconds)
    gbdt_dp_notes.annotate(out, cfg)  # model.kind=gbdt only
    scorecard_dp_run.annotate(out, cfg)  # model.kind=scorecard only
    write_results(out_dir, out)
    return RunResult(metrics=out, seconds=phases.seconds)


def _connect(ctx: RunContext) -> Tables:
    """The authority's table (decrypted with its keystore), then every silo's hello."""
    ids, labels, gate = load_authority(ctx.data_dir / AUTHORITY, ctx.store, ctx.cfg.eligibility)
    return Tables(ids, labels, gate, ctx.fed.connect())


def _resume(ctx: RunContext) -> tuple[RunState, TrainState]:
    """The run and training state of the checkpoint; the ledger cut back to the checkpoint's
    length (lines after it are written again), and the silos told where to continue."""
    run, state, ledger_offset = checkpoint.load(ctx.out_dir, ctx.config, ctx.store)
    ctx.ledger.truncate(ledger_offset)
    ctx.fed.broadcast(m.RESUME, m.make_content({"run": run.run_key, "round": state.trip}))
    log.info("resuming run %s after round %d", run.run_key, state.trip)
    return run, state


def _train_and_calibrate(ctx: RunContext, plan: Plan, phases: run_phases.PhaseTimer,
                         progress: Callable[..., None] | None) -> Trained:
    """Federated training (a checkpoint after every round), then, timed as `score`, the
    calibration. The privacy plan closes however this ends: its ledger thread flushes."""
    run, split, privacy = plan.run, plan.split, plan.privacy
    n_positions = len(run.authority_rows)
    try:
        if ctx.cfg.model.kind == "gbdt":
            result, calibrate, spent = gbdt_dp_run.train_trees(
                ctx.fed, ctx.cfg, run, split, plan.y, phases, ctx.ledger, ctx.random,
                plan.reasons)
            return Trained(result, calibrate, {**privacy.summary(), **spent})
        if ctx.cfg.model.kind == "scorecard":
            job = TreeJob(ctx.fed, ctx.cfg, run.run_key, split.train, split.val,
                          n_positions, plan.y, run.y_view)
            result, calibrate, spent = scorecard_dp_run.train_scorecard(
                job, phases, ctx.ledger, ctx.random, plan.reasons)
            return Trained(result, calibrate, {**privacy.summary(), **spent})
        result = train(_train_job(ctx, plan), progress=progress, state=plan.state,
                       on_round=_checkpointer(ctx, privacy))
        phases.start("score")
        calibrate = _calibration(result.logits[split.val], plan.y[split.val], privacy,
                                 ctx.random, run.run_key, n_positions * ctx.cfg.split.val,
                                 result.round_trips)
        return Trained(result, calibrate, privacy.summary())
    finally:
        privacy.close()


def _train_job(ctx: RunContext, plan: Plan) -> TrainJob:
    cfg, run = ctx.cfg, plan.run
    return TrainJob(
        fed=ctx.fed, y_train_view=run.y_view, y=plan.y.astype(np.float64),
        train_pos=plan.split.train, val_pos=plan.split.val, n_positions=len(run.authority_rows),
        cfg=cfg.train, spec=plan.spec, privacy=plan.privacy, random=ctx.random,
        run_key=run.run_key, prior=run.prior, secure=cfg.aggregation.secure_sum,
        mode=cfg.aggregation.mode, top_hidden=cfg.model.top_hidden, explain=plan.reasons,
    )


def _checkpointer(ctx: RunContext, privacy: PrivacyPlan) -> Callable[[TrainState], None]:
    """`on_round` for training: a copy of the state, saved once the ledger lines recorded so
    far are written (so a checkpoint never runs ahead of its ledger); then, for resume tests,
    a crash on purpose when asked."""
    def on_round(current: TrainState) -> None:
        # Training goes on mutating `current` while the ledger thread has yet to save it.
        snapshot = replace(current, history=list(current.history),
                           silo_seconds=dict(current.silo_seconds))
        privacy.after_ledger(
            lambda: checkpoint.save(ctx.out_dir, snapshot, ctx.ledger.offset(), ctx.store)
        )
        _maybe_inject_failure(current.trip, privacy)

    return on_round


def _calibration(z_val: np.ndarray, y_val: np.ndarray, privacy: PrivacyPlan,
                 random: SecretRandom, run_key: str, expected_n: float, round_: int
                 ) -> scoring.Platt:
    """Platt calibration on validation people: exact without DP, else the DP fit of
    server/scoring.py (validation people are disjoint from training people: their own
    population in the ledger)."""
    if not privacy.cfg.dp_sgd:
        return scoring.Platt.fit(z_val, y_val)
    if not scoring.Platt.private_fit_pays(privacy.calibration_sigma, expected_n):
        log.warning("too few validation people (about %d) for a private calibration at this "
                    "epsilon: the model's own probabilities are used", expected_n)
        return scoring.Platt()
    privacy.record_calibration(round_)
    return scoring.Platt.fit_private(
        z_val, y_val, noise_multiplier=privacy.calibration_sigma, steps=CALIBRATION_STEPS,
        expected_n=expected_n, rng=random.generator("calibration", run_key))


FAIL_AFTER_ROUND = "FEDSCORE_FAIL_AFTER_ROUND"


def _maybe_inject_failure(round_: int, privacy: PrivacyPlan) -> None:
    """Crash on purpose after a round (for resume tests): `FEDSCORE_FAIL_AFTER_ROUND=N`."""
    if os.environ.get(FAIL_AFTER_ROUND) == str(round_):
        privacy.flush()
        raise RuntimeError(f"injected failure after round {round_} ({FAIL_AFTER_ROUND})")
