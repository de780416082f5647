"""One run of the scoring authority, start to finish.

connect -> PSI alignment -> split -> federated training -> calibration -> scores -> outputs.
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
from clients.protocol.schema import AUTHORITY
from crypto.at_rest import REF_HASH, Keystore, open_keystore
from crypto.identity import keyed_refs, load_or_create_pepper
from crypto.secret_random import SecretRandom
from server import checkpoint, explanations, metrics, run_phases, scoring
from server.alignment import Alignment, announce, joint_order, private_intersections
from server.checkpoint import RunState, TrainState
from server.config import AuthorityConfig, to_flat
from server.eligibility import ELIGIBLE
from server.federation import Federation
from server.label_dp import randomized_response
from server.labels import load_authority
from server.ledger import Ledger
from server.privacy import CALIBRATION_STEPS, PrivacyPlan
from server.scores_file import PEPPER_FILE, write_scores, write_split
from server.split import Split, random_split
from server.training import train

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
    later runs reuse the first run's private intersections instead of repeating PSI."""
    phases = run_phases.PhaseTimer(progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = to_flat(cfg)
    ledger = Ledger(out_dir)
    store = open_keystore(cfg.storage.keystore, data_dir)
    random = authority_random(store, data_dir)

    phases.start("connect")
    ids, labels, gate = load_authority(data_dir / AUTHORITY, store, cfg.eligibility)
    info = fed.connect()

    if resume:
        run, state, ledger_offset = checkpoint.load(out_dir, config, store)
        ledger.truncate(ledger_offset)
        fed.broadcast(m.RESUME, m.make_content({"run": run.run_key, "round": state.trip}))
        log.info("resuming run %s after round %d", run.run_key, state.trip)
    else:
        phases.start("psi")
        run, state = _align_and_split(fed, cfg, ids, labels, config, random, psi_cache), None
    split = Split(run.train, run.val, run.test)
    y = labels[run.authority_rows].astype(np.int8)
    n_positions = len(run.authority_rows)
    privacy = PrivacyPlan(cfg.privacy, fed.silos, len(split.train), cfg.train.batch_size,
                          cfg.train.epochs, ledger, summaries=summaries_asked(cfg))
    spec = ModelSpec(
        cfg.model.hidden, cfg.train.lr, cfg.train.weight_decay, cfg.seed,
        noise_multiplier=privacy.sigma, max_grad_norm=cfg.privacy.max_grad_norm,
        sample_rate=privacy.q, expected_batch=privacy.expected_batch,
        transcript_sigma=cfg.privacy.transcript_sigma,
        transcript_clip=cfg.privacy.transcript_clip,
        outputs=cfg.model.embedding_dim if cfg.aggregation.mode == "concat" else 1,
    )
    secure = cfg.aggregation.secure_sum
    if cfg.aggregation.mode == "concat":
        log.warning("aggregation.mode=concat: the authority sees every silo's embeddings; "
                    "secure aggregation does not apply (docs/threat-model.md)")
    if state is None:
        checkpoint.save_run(out_dir, run, store)
        run_phases.finish(out_dir, "align")
        inputs = announce(fed, Alignment(run.authority_rows, run.silo_rows, {}),
                          {**spec.to_config(), "run": run.run_key,
                           "secure": secure})
        privacy.record_start()
    else:
        inputs = {s: int(info[s]["inputs"]) for s in fed.silos}
        privacy.restore(state.privacy_spent, state.privacy_round_steps,
                        state.transcript_releases, state.transcript_sampled)

    def on_round(current: TrainState) -> None:
        snapshot = replace(current, history=list(current.history),
                           silo_seconds=dict(current.silo_seconds))
        privacy.after_ledger(
            lambda: checkpoint.save(out_dir, snapshot, ledger.offset(), store)
        )
        _maybe_inject_failure(current.trip, privacy)

    reasons = _reasons_asked(cfg)
    phases.start("train")
    try:
        result = train(
            fed, run.y_view, y.astype(np.float64), split.train, split.val, n_positions,
            cfg.train, spec, privacy, progress, state=state, on_round=on_round,
            secure=secure, mode=cfg.aggregation.mode, top_hidden=cfg.model.top_hidden,
            explain=reasons, random=random, run_key=run.run_key, prior=run.prior,
        )
        phases.start("score")
        calibrate = _calibration(result.logits[split.val], y[split.val], privacy, random,
                                 run.run_key, n_positions * cfg.split.val, result.round_trips)
        privacy_summary = privacy.summary()
    finally:
        privacy.close()

    p = calibrate(result.logits)
    score = scoring.to_score(p, cfg.score)
    tier = scoring.to_tier(score)
    # The opening conditions: people who fail them get a status and reasons, not a score. The
    # model's metrics (AUC, KS, Brier) cover every test person, comparable with the baselines
    # and the oracle; what is about scores (tiers, default rate by tier) covers scored people.
    gate = gate.iloc[run.authority_rows].reset_index(drop=True)
    eligible = (gate["status"] == ELIGIBLE).to_numpy()
    summary = metrics.summary(y[split.test], p[split.test])
    test = split.test[eligible[split.test]]
    pepper = load_or_create_pepper(data_dir / AUTHORITY / PEPPER_FILE)
    ref_hash = REF_HASH[store.suite] if store else "sha256"
    refs = keyed_refs(ids.to_numpy()[run.authority_rows], pepper, ref_hash)
    why = _reason_points(result.explained, result.bias, calibrate, cfg, reasons)
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
    scores = _gated(scores, gate, eligible)
    write_scores(out_dir, scores, store, run.run_key)
    write_split(out_dir, split.labels(n_positions), store, run.run_key)
    phases.stop()

    out = {
        **summary,
        "scored_test_auc": metrics.auc(y[test], p[test]) if len(np.unique(y[test])) == 2
        else None,
        "tiers": scoring.tier_counts(tier[eligible]),
        "test_tiers": scoring.tier_counts(tier[test]),
        "test_default_rate_by_tier": _rate_by_tier(y[test], tier[test]),
        "calibration": {"a": calibrate.a, "b": calibrate.b},
        # What re-scoring one person later needs (server/rescore.py): the silos keep their
        # models of the final round under the run key.
        "model": {"bias": result.bias, "final_round": result.round_trips,
                  "run_key": run.run_key, "reasons": reasons if why is not None else 0},
        "contributions": {silo: scoring.contribution_points(s, calibrate, cfg.score)
                          for silo, s in result.contributions.items()},
        "people": {
            "authority": len(ids),
            "silo_rows": {s: int(info[s]["rows"]) for s in fed.silos},
            "overlap": run.overlap,
            "ineligible": int((~eligible).sum()),
            "ineligible_by_reason": {str(k): int(v) for k, v in
                                     gate.loc[~eligible, "codes"].value_counts().items() if v},
            "aligned": n_positions,
            "train": len(split.train), "val": len(split.val), "test": len(split.test),
        },
        **privacy_summary,
        "training_steps": result.steps,
        "stopped_by_budget_cap": result.stopped_by_cap,
        "model_inputs": inputs,
        "history": result.history,
        "round_trips": result.round_trips,
        "subject_ref": f"hmac-{ref_hash}",
        "aggregation_mode": cfg.aggregation.mode,
        "secure_aggregation": secure,
        "authority_sees": authority_sees(cfg, secure, reasons),
        "resumed": resume,
        "silo_compute_seconds": {s: round(v, 3) for s, v in result.silo_seconds.items()},
        "seconds": phases.seconds,
        "config": to_flat(cfg),
    }
    (out_dir / "authority.json").write_text(json.dumps(out, indent=2))
    # Before the checkpoint goes: a run killed from here on resumes at its baselines.
    run_phases.finish(out_dir, "train")
    run_phases.finish(out_dir, "score")
    checkpoint.remove(out_dir)
    log.info("test AUC %.4f, KS %.4f, Brier %.4f", summary["auc"], summary["ks"], summary["brier"])
    return RunResult(metrics=out, seconds=phases.seconds)


def _align_and_split(
    fed: Federation, cfg: AuthorityConfig, ids: pd.Series, labels: np.ndarray, config: dict,
    random: SecretRandom, psi_cache: dict | None = None,
) -> RunState:
    """PSI with every silo, the shared order, the split, and the labels gradients may see.

    Every draw here (the order of positions, the split, the label flips, the prior's noise)
    comes from the authority's secret streams for this run, never from the public seed."""
    pairs = psi_cache.get("pairs") if psi_cache is not None else None
    if pairs is None:
        pairs = private_intersections(fed, ids, workers=cfg.psi.workers)
        if psi_cache is not None:
            psi_cache["pairs"] = pairs
    run_key = derive_run_key(random, config)
    alignment = joint_order(pairs, len(ids), random.generator("positions", run_key))
    y = labels[alignment.authority_rows].astype(np.int8)
    split = random_split(y, cfg.split, random.generator("split", run_key))
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


def authority_random(store: Keystore | None, data_dir: Path) -> SecretRandom:
    """The authority's secret streams: its secret lives in its keystore (or, without one, in its
    own party directory), 0600, never in config, messages or outputs."""
    return SecretRandom.load_or_create(store.path if store else data_dir / AUTHORITY, AUTHORITY)


def derive_run_key(random: SecretRandom, config: dict) -> str:
    """The run's public key, derived from the authority's secret and the configuration: the
    same keystore and config give the same run (bit for bit), other keystores other runs.
    Where the keystore sits (storage.*) says where files live, not what is computed: a keystore
    moved or copied to another machine still reproduces its runs."""
    computed = {k: v for k, v in config.items() if not k.startswith("storage.")}
    return random.key("run-key", json.dumps(computed, sort_keys=True))[:8].hex()


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


def _gated(scores: pd.DataFrame, gate: pd.DataFrame, eligible: np.ndarray) -> pd.DataFrame:
    """`status` (scored / ineligible) and the reasons; no score, tier or points for people who
    fail the opening conditions."""
    out = scores.copy()
    out["status"] = pd.Categorical.from_codes((~eligible).astype(np.int8),
                                              ["scored", "ineligible"])
    out["ineligible_reason"] = gate["reason"].to_numpy()
    out["ineligible_reason_zh"] = gate["reason_zh"].to_numpy()
    out["score"] = pd.array(np.where(eligible, out["score"], 0), dtype="Int16")
    out.loc[~eligible, "score"] = pd.NA
    hidden = ["probability", "tier"] + [c for c in out if c.startswith(("points_", "reason_"))]
    out.loc[~eligible, hidden] = np.nan
    return out


def _reasons_asked(cfg: AuthorityConfig) -> int:
    """Reason codes to ask the silos for: none outside plain `sum` mode (config comment)."""
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


def _rate_by_tier(y: np.ndarray, tier: np.ndarray) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for i, key in enumerate(scoring.TIER_KEYS):
        sel = tier == i
        out[key] = float(y[sel].mean()) if sel.any() else None
    return out
