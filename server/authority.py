"""One run of the scoring authority, start to finish.

connect -> PSI alignment -> split -> federated training -> calibration -> scores -> outputs,
one function per phase (`_connect`, `_resume` or `_align_and_split`, `_plan_training`,
`_train_and_calibrate`, `_score`, `_results` and `_write_results`), each taking what the
phases before it produced (`_Tables`, `RunState`, `_Plan`, `_Trained`, `_Scored`): which
inputs a phase reads is in its signature, not in a closure over a long function's locals.
Writes into the run directory only what the authority may publish: keyed subject references
(HMAC under the authority's pepper), never a phone number or an unkeyed hash of one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol import messages as m
from clients.protocol.dp_constants import PRIOR_NOISE_MULTIPLIER
from clients.protocol.model import ModelSpec
from clients.protocol.reasons import MAX_REASONS
from clients.protocol.schema import AUTHORITY, authority_schema
from crypto.at_rest import REF_HASH, Keystore, open_keystore
from crypto.identity import PHONE, IdentifierFormat, keyed_refs, load_or_create_pepper
from crypto.secret_random import SecretRandom
from server import (
    checkpoint,
    explanations,
    gbdt_dp_run,
    metrics,
    run_phases,
    scorecard_run,
    scoring,
)
from server.alignment import Alignment, announce, joint_order, private_intersections
from server.checkpoint import RunState, TrainState
from server.config import AuthorityConfig
from server.config_keys import to_flat
from server.eligibility import ELIGIBLE
from server.federation import Federation
from server.gbdt_run import TreeJob
from server.label_dp import randomized_response
from server.labels import load_authority
from server.ledger import Ledger
from server.privacy import CALIBRATION_STEPS, PrivacyPlan
from server.run_keys import PEOPLE_KEYS, authority_random, derive_people_key, derive_run_key
from server.scores_file import PEPPER_FILE, gated, write_scores, write_split
from server.split import Split, random_split
from server.training import TrainJob, TrainResult, train

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    metrics: dict
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Context:
    """What every phase of one run works with: the federation, the configuration, where the
    run's files go, and the authority's keystore, ledger and secret streams."""

    fed: Federation
    cfg: AuthorityConfig
    config: dict  # cfg flattened: what the run key and a resumed checkpoint are checked against
    data_dir: Path
    out_dir: Path
    ledger: Ledger
    store: Keystore | None
    random: SecretRandom


@dataclass(frozen=True)
class _Tables:
    """The authority's own table and what the silos said on connecting."""

    ids: pd.Series
    labels: np.ndarray
    gate: pd.DataFrame  # eligibility: status, reason codes and words, per authority row
    info: dict  # per silo: its row count and model inputs


@dataclass(frozen=True)
class _Plan:
    """What training starts from: the run fixed before it (alignment, split, the labels the
    gradients see), the state to resume, and the privacy plan and model that follow."""

    run: RunState
    state: TrainState | None  # None: a fresh start
    split: Split
    y: np.ndarray  # the clean labels of every aligned position
    privacy: PrivacyPlan
    spec: ModelSpec
    inputs: dict[str, int]  # each silo's model inputs
    reasons: int  # reason codes asked of the silos (0: none)


@dataclass(frozen=True)
class _Trained:
    """Training's result, the calibration fitted on validation people, and the privacy
    spent by both (read before the privacy plan closes)."""

    result: TrainResult
    calibrate: scoring.Platt
    privacy_summary: dict


@dataclass(frozen=True)
class _Scored:
    """The scores as written, and what the outputs say about them."""

    p: np.ndarray  # the calibrated probability of every aligned position
    tier: np.ndarray
    gate: pd.DataFrame  # the eligibility gate of every aligned position
    eligible: np.ndarray
    ref_hash: str
    with_reasons: bool


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
    ctx = _Context(fed, cfg, config, data_dir, out_dir, ledger, store,
                   authority_random(store, data_dir))

    phases.start("connect")
    tables = _connect(ctx)
    if resume:
        run, state = _resume(ctx)
    else:
        phases.start("psi")  # the DP trees draw no RR nor prior of the run's (sgd_config)
        run, state = _align_and_split(fed, gbdt_dp_run.sgd_config(cfg), tables.ids,
                                      tables.labels, config, ctx.random, psi_cache,
                                      authority_schema(data_dir / AUTHORITY).id_format), None
    plan = _plan_training(ctx, tables, run, state)
    phases.start("train")
    trained = _train_and_calibrate(ctx, plan, phases, progress)
    scored = _score(ctx, tables, plan, trained)
    phases.stop()
    out = _results(ctx, tables, plan, trained, scored, resume, phases.seconds)
    gbdt_dp_run.annotate(out, cfg)  # model.kind=gbdt only
    scorecard_run.annotate(out, cfg)  # model.kind=scorecard only
    _write_results(out_dir, out)
    return RunResult(metrics=out, seconds=phases.seconds)


def _connect(ctx: _Context) -> _Tables:
    """The authority's table (decrypted with its keystore), then every silo's hello."""
    ids, labels, gate = load_authority(ctx.data_dir / AUTHORITY, ctx.store, ctx.cfg.eligibility)
    return _Tables(ids, labels, gate, ctx.fed.connect())


def _resume(ctx: _Context) -> tuple[RunState, TrainState]:
    """The run and training state of the checkpoint; the ledger cut back to the checkpoint's
    length (lines after it are written again), and the silos told where to continue."""
    run, state, ledger_offset = checkpoint.load(ctx.out_dir, ctx.config, ctx.store)
    ctx.ledger.truncate(ledger_offset)
    ctx.fed.broadcast(m.RESUME, m.make_content({"run": run.run_key, "round": state.trip}))
    log.info("resuming run %s after round %d", run.run_key, state.trip)
    return run, state


def _plan_training(ctx: _Context, tables: _Tables, run: RunState, state: TrainState | None
                   ) -> _Plan:
    """Labels, privacy plan and model; then, on a fresh run, the run's checkpoint, the silos'
    announcement and the ledger's first lines, or, resumed, the accountants as they were."""
    cfg = ctx.cfg
    split = Split(run.train, run.val, run.test)
    privacy = PrivacyPlan(gbdt_dp_run.sgd_config(cfg).privacy, ctx.fed.silos, len(split.train),
                          cfg.train.batch_size, cfg.train.epochs, ctx.ledger, summaries_asked(cfg))
    for guardrail in privacy.guardrails():  # also in authority.json and metrics.json
        log.warning("privacy guardrail (%s): %s", guardrail.check, guardrail.message)
    spec = _model_spec(cfg, privacy, len(ctx.fed.silos))
    if cfg.aggregation.mode == "concat":
        log.warning("aggregation.mode=concat: the authority sees every silo's embeddings; "
                    "secure aggregation does not apply (docs/threat-model.md)")
    if state is None:
        checkpoint.save_run(ctx.out_dir, run, ctx.store)
        run_phases.finish(ctx.out_dir, "align")
        inputs = announce(ctx.fed, Alignment(run.authority_rows, run.silo_rows, {}),
                          {**spec.to_config(), "run": run.run_key,
                           "secure": cfg.aggregation.secure_sum})
        privacy.record_start()
    else:
        inputs = {s: int(tables.info[s]["inputs"]) for s in ctx.fed.silos}
        privacy.restore(state.privacy_spent, state.privacy_round_steps,
                        state.transcript_releases, state.transcript_sampled)
    y = tables.labels[run.authority_rows].astype(np.int8)
    return _Plan(run, state, split, y, privacy, spec, inputs, _reasons_asked(cfg))


def _model_spec(cfg: AuthorityConfig, privacy: PrivacyPlan, silos: int) -> ModelSpec:
    """The silos' model: the configuration's, with the noise and sampling the plan fixed.
    Delay compensation applies where it was measured better: `sum` mode without DP-SGD (under
    DP-SGD it was not: -0.001 on average; bench/RESULTS.md "Stale gradients")."""
    concat = cfg.aggregation.mode == "concat"
    compensate = not concat and privacy.sigma == 0
    return ModelSpec(
        cfg.model.hidden, cfg.train.lr, cfg.train.weight_decay, cfg.seed,
        noise_multiplier=privacy.sigma, max_grad_norm=privacy.block_clip,
        sample_rate=privacy.q, expected_batch=privacy.expected_batch,
        transcript_sigma=cfg.privacy.transcript_sigma,
        transcript_clip=cfg.privacy.transcript_clip,
        outputs=cfg.model.embedding_dim if concat else 1,
        staleness_correction=cfg.train.delay_compensation * silos if compensate else 0.0,
    )


def _train_and_calibrate(ctx: _Context, plan: _Plan, phases: run_phases.PhaseTimer,
                         progress: Callable[..., None] | None) -> _Trained:
    """Federated training (a checkpoint after every round), then, timed as `score`, the
    calibration. The privacy plan closes however this ends: its ledger thread flushes."""
    run, split, privacy = plan.run, plan.split, plan.privacy
    n_positions = len(run.authority_rows)
    try:
        if ctx.cfg.model.kind == "gbdt":
            result, calibrate, spent = gbdt_dp_run.train_trees(
                ctx.fed, ctx.cfg, run, split, plan.y, phases, ctx.ledger, ctx.random)
            return _Trained(result, calibrate, {**privacy.summary(), **spent})
        if ctx.cfg.model.kind == "scorecard":
            job = TreeJob(ctx.fed, ctx.cfg, run.run_key, split.train, split.val,
                                      n_positions, plan.y, run.y_view)
            result, calibrate = scorecard_run.train_and_calibrate(job, phases, plan.reasons)
            return _Trained(result, calibrate, privacy.summary())
        result = train(_train_job(ctx, plan), progress=progress, state=plan.state,
                       on_round=_checkpointer(ctx, privacy))
        phases.start("score")
        calibrate = _calibration(result.logits[split.val], plan.y[split.val], privacy,
                                 ctx.random, run.run_key, n_positions * ctx.cfg.split.val,
                                 result.round_trips)
        return _Trained(result, calibrate, privacy.summary())
    finally:
        privacy.close()


def _train_job(ctx: _Context, plan: _Plan) -> TrainJob:
    cfg, run = ctx.cfg, plan.run
    return TrainJob(
        fed=ctx.fed, y_train_view=run.y_view, y=plan.y.astype(np.float64),
        train_pos=plan.split.train, val_pos=plan.split.val, n_positions=len(run.authority_rows),
        cfg=cfg.train, spec=plan.spec, privacy=plan.privacy, random=ctx.random,
        run_key=run.run_key, prior=run.prior, secure=cfg.aggregation.secure_sum,
        mode=cfg.aggregation.mode, top_hidden=cfg.model.top_hidden, explain=plan.reasons,
    )


def _checkpointer(ctx: _Context, privacy: PrivacyPlan) -> Callable[[TrainState], None]:
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


def _score(ctx: _Context, tables: _Tables, plan: _Plan, trained: _Trained) -> _Scored:
    """Scores, tiers and reasons for every aligned person under a keyed reference; the
    scores file and the authority's private record of the split."""
    cfg, run, calibrate = ctx.cfg, plan.run, trained.calibrate
    p = calibrate(trained.result.logits)
    score = scoring.to_score(p, cfg.score)
    tier = scoring.to_tier(score)
    # The opening conditions: people who fail them get a status and reasons, not a score.
    gate = tables.gate.iloc[run.authority_rows].reset_index(drop=True)
    eligible = (gate["status"] == ELIGIBLE).to_numpy()
    pepper = load_or_create_pepper(ctx.data_dir / AUTHORITY / PEPPER_FILE)
    ref_hash = REF_HASH[ctx.store.suite] if ctx.store else "sha256"
    refs = keyed_refs(tables.ids.to_numpy()[run.authority_rows], pepper, ref_hash)
    why = _reason_points(trained.result.explained, trained.result.bias, calibrate, cfg,
                         plan.reasons)
    # Published scores carry no split: who was trained on is the authority's private record.
    scores = pd.DataFrame(
        {
            "subject_ref": refs,
            "probability": p.astype(np.float64),
            "score": score,
            "tier": pd.Categorical.from_codes(tier, scoring.TIER_KEYS),
        }
    )
    if why is not None:
        scores = pd.concat([scores, why], axis=1)
    scores = gated(scores, gate, eligible)
    write_scores(ctx.out_dir, scores, ctx.store, run.run_key)
    write_split(ctx.out_dir, plan.split.labels(len(run.authority_rows)), ctx.store, run.run_key)
    return _Scored(p, tier, gate, eligible, ref_hash, why is not None)


def _results(ctx: _Context, tables: _Tables, plan: _Plan, trained: _Trained, scored: _Scored,
             resume: bool, seconds: dict[str, float]) -> dict:
    """authority.json: the model's metrics, the privacy spent, and how the run went."""
    cfg, result, secure = ctx.cfg, trained.result, ctx.cfg.aggregation.secure_sum
    return {
        **_model_metrics(ctx, plan, trained, scored),
        "people": _people(ctx, tables, plan, scored),
        **trained.privacy_summary,
        "training_steps": result.steps,
        "stopped_by_budget_cap": result.stopped_by_cap,
        "model_inputs": plan.inputs,
        "history": result.history,
        "round_trips": result.round_trips,
        "subject_ref": f"hmac-{scored.ref_hash}",
        "aggregation_mode": cfg.aggregation.mode,
        "secure_aggregation": secure,
        "authority_sees": authority_sees(cfg, secure, plan.reasons),
        "resumed": resume,
        "silo_compute_seconds": {s: round(v, 3) for s, v in result.silo_seconds.items()},
        "seconds": seconds,
        "config": to_flat(cfg),
    }


def _model_metrics(ctx: _Context, plan: _Plan, trained: _Trained, scored: _Scored) -> dict:
    """The model's test figures (AUC, KS, Brier ...) on two named populations: `scored_test`,
    the eligible test people, whom the score serves (None when they hold one class only), and
    `all_test`, every test person, comparable with the baselines and the oracle, which see
    no opening conditions. What is about scores (tiers, default rate by tier) covers scored
    people only."""
    y, split, p, tier = plan.y, plan.split, scored.p, scored.tier
    result, calibrate = trained.result, trained.calibrate
    test = split.test[scored.eligible[split.test]]
    return {
        "scored_test": (metrics.summary(y[test], p[test]) if len(np.unique(y[test])) == 2
                        else None),
        "all_test": metrics.summary(y[split.test], p[split.test]),
        "tiers": scoring.tier_counts(tier[scored.eligible]),
        "test_tiers": scoring.tier_counts(tier[test]),
        "test_default_rate_by_tier": scoring.rate_by_tier(y[test], tier[test]),
        "calibration": calibrate.to_json(),
        # What re-scoring one person later needs (server/rescore.py): the silos keep their
        # models of the final round under the run key.
        "model": {"bias": result.bias, "final_round": result.round_trips,
                  "run_key": plan.run.run_key,
                  "reasons": plan.reasons if scored.with_reasons else 0},
        # What keys the split and the shared order (derive_people_key): runs that agree on
        # these settings test on the same people; runs made before this record do not say.
        "split_from": list(PEOPLE_KEYS),
        "contributions": {silo: scoring.contribution_points(s, calibrate, ctx.cfg.score)
                          for silo, s in result.contributions.items()},
    }


def _people(ctx: _Context, tables: _Tables, plan: _Plan, scored: _Scored) -> dict:
    """How many people each step kept: counts only, nobody in particular."""
    run, split, gate, eligible = plan.run, plan.split, scored.gate, scored.eligible
    return {
        "authority": len(tables.ids),
        "silo_rows": {s: int(tables.info[s]["rows"]) for s in ctx.fed.silos},
        "overlap": run.overlap,
        "ineligible": int((~eligible).sum()),
        "ineligible_by_reason": {str(k): int(v) for k, v in
                                 gate.loc[~eligible, "codes"].value_counts().items() if v},
        "aligned": len(run.authority_rows),
        "train": len(split.train), "val": len(split.val), "test": len(split.test),
        "test_scored": int(eligible[split.test].sum()),
    }


def _write_results(out_dir: Path, out: dict) -> None:
    """authority.json, then the phases' record, and only then the checkpoint goes: a run
    killed from here on resumes at its baselines."""
    (out_dir / "authority.json").write_text(json.dumps(out, indent=2))
    run_phases.finish(out_dir, "train")
    run_phases.finish(out_dir, "score")
    checkpoint.remove(out_dir)
    scored, every = out["scored_test"] or {}, out["all_test"]
    log.info("test AUC %s on scored people, %.4f on all test people; KS %s, Brier %s (scored)",
             _fmt(scored.get("auc")), every["auc"], _fmt(scored.get("ks")),
             _fmt(scored.get("brier")))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _align_and_split(
    fed: Federation, cfg: AuthorityConfig, ids: pd.Series, labels: np.ndarray, config: dict,
    random: SecretRandom, psi_cache: dict | None = None,
    id_format: IdentifierFormat = PHONE,
) -> RunState:
    """PSI with every silo, the shared order, the split, and the labels gradients may see.

    Every draw here (the order of positions, the split, the label flips, the prior's noise)
    comes from the authority's secret streams for this run, never from the public seed."""
    pairs = psi_cache.get("pairs") if psi_cache is not None else None
    if pairs is None:
        pairs = private_intersections(fed, ids, workers=cfg.psi.workers, id_format=id_format)
        if psi_cache is not None:
            psi_cache["pairs"] = pairs
    run_key = derive_run_key(random, config)
    people = derive_people_key(random, config)
    alignment = joint_order(pairs, len(ids), random.generator("positions", people))
    y = labels[alignment.authority_rows].astype(np.int8)
    split = random_split(y, cfg.split, random.generator("split", people))
    # Randomised response once, before training: gradients only ever see y_view.
    y_view = y.astype(np.float64)
    if cfg.privacy.label_dp:
        y_view[split.train] = randomized_response(y[split.train], cfg.privacy.label_epsilon,
                                                  random.generator("label-rr", run_key))
    return RunState(
        run_key=run_key, config=config,
        prior=(private_prior(y_view[split.train], random.generator("prior", run_key))
               if cfg.privacy.dp_sgd else float(y_view[split.train].mean())),
        authority_rows=alignment.authority_rows, silo_rows=alignment.silo_rows,
        train=split.train, val=split.val, test=split.test, y_view=y_view,
        overlap=alignment.overlap,
    )


def summaries_asked(cfg: AuthorityConfig) -> bool:
    """Whether the silos send DP summaries of their contributions at the end (sum mode, no
    transcript noise; server/training.py asks for them then)."""
    return cfg.aggregation.mode == "sum" and not cfg.privacy.transcript_dp


def private_prior(y_train: np.ndarray, rng: np.random.Generator) -> float:
    """The training default rate, from the count of positives and the count of people with
    Gaussian noise (L2 sensitivity sqrt 2 under adding or removing one person, multiplier
    PRIOR_NOISE_MULTIPLIER; a ledger line of its own). It starts the bias."""
    std = PRIOR_NOISE_MULTIPLIER * np.sqrt(2.0)
    positives, people = np.array([y_train.sum(), len(y_train)], float) + rng.normal(0, std, 2)
    return float(np.clip(positives / max(people, 1.0), 0.001, 0.999))


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


def _reasons_asked(cfg: AuthorityConfig) -> int:
    """Reason codes to ask the silos for: none outside plain `sum` mode (config comment)."""
    if cfg.model.kind == "scorecard":  # its partial logits show the authority as much
        return cfg.explain.reasons or MAX_REASONS
    if not cfg.explain.reasons:
        return 0
    if cfg.aggregation.mode != "sum" or cfg.privacy.transcript_dp:
        why = ("aggregation.mode=concat has no additive points" if cfg.aggregation.mode != "sum"
               else "transcript DP does not account for exact per-silo points")
        log.warning("no reason codes: %s (explain.reasons=0 silences this)", why)
        return 0
    log.warning("explain.reasons=%d: the authority will see each silo's points per person, "
                "which secure sum otherwise hides", cfg.explain.reasons)
    return cfg.explain.reasons


def authority_sees(cfg: AuthorityConfig, secure: bool, reasons: int) -> list[str]:
    """What this run let the authority see of the silos, in words, for authority.json: the
    README's promise (only the sum) holds exactly when this is the first line alone."""
    seen = ["the per-person sum of the silos' contributions" if secure
            else "each silo's contribution per person (secure sum off)"]
    if cfg.aggregation.mode == "concat":
        seen = ["each silo's embedding per person (aggregation.mode=concat)"]
    if reasons:
        seen.append(f"each silo's points per person and its top {reasons} reasons "
                    "(explain.reasons)")
    return seen


def _reason_points(explained: dict, bias: float, calibrate: scoring.Platt,
                   cfg: AuthorityConfig, reasons: int) -> pd.DataFrame | None:
    if not explained:
        return None
    try:
        return explanations.points_frame(explained, bias, calibrate, cfg.score, reasons)
    except explanations.ExplanationError as exc:
        log.warning("no reason codes: %s", exc)
        return None


FAIL_AFTER_ROUND = "FEDSCORE_FAIL_AFTER_ROUND"


def _maybe_inject_failure(round_: int, privacy: PrivacyPlan) -> None:
    """Crash on purpose after a round (for resume tests): `FEDSCORE_FAIL_AFTER_ROUND=N`."""
    if os.environ.get(FAIL_AFTER_ROUND) == str(round_):
        privacy.flush()
        raise RuntimeError(f"injected failure after round {round_} ({FAIL_AFTER_ROUND})")
