"""What an authority run writes: every aligned person's score, tier and reasons under a keyed
reference (scores.parquet.enc, the private split record), and authority.json: the model's
test figures, counts of people, the privacy spent and what the authority saw.

Only what the authority may publish: keyed subject references (HMAC under the authority's
pepper), never a phone number or an unkeyed hash of one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.schema import AUTHORITY
from crypto.at_rest import REF_HASH
from crypto.identity import keyed_refs, load_or_create_pepper
from server import checkpoint, explanations, metrics, run_phases, scoring
from server.config import AuthorityConfig
from server.config_keys import to_flat
from server.eligibility import ELIGIBLE
from server.kept_model import write_kept
from server.run_context import Plan, RunContext, Scored, Tables, Trained
from server.run_keys import PEOPLE_KEYS
from server.scores_file import PEPPER_FILE, gated, write_scores, write_split

log = logging.getLogger(__name__)


def score_everyone(ctx: RunContext, tables: Tables, plan: Plan, trained: Trained) -> Scored:
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
    if trained.result.kept_model:  # a tree or scorecard run: to score again after it
        write_kept(ctx.out_dir, trained.result.kept_model, ctx.store, run.run_key)
    return Scored(p, tier, gate, eligible, ref_hash, why is not None)


def results(ctx: RunContext, tables: Tables, plan: Plan, trained: Trained, scored: Scored,
            resume: bool, seconds: dict[str, float]) -> dict:
    """authority.json: the model's metrics, the privacy spent, and how the run went."""
    cfg, result, secure = ctx.cfg, trained.result, ctx.cfg.aggregation.secure_sum
    return {
        **_model_metrics(ctx, plan, trained, scored),
        "people": _people(ctx, tables, plan, scored),
        **trained.privacy_summary,
        # Why the configuration may not learn, whatever the model (the MLP's sampling and
        # noise, the trees' and scorecard's rules): messages only, no label statistic.
        "guardrails": [g.as_dict() for g in plan.guardrails],
        "training_steps": result.steps,
        "stopped_by_budget_cap": result.stopped_by_cap,
        "model_inputs": plan.inputs,
        "history": result.history,
        # MLP runs: the epoch whose weights were scored and why (server/training.py).
        **({"kept": result.kept} if result.kept else {}),
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


def _model_metrics(ctx: RunContext, plan: Plan, trained: Trained, scored: Scored) -> dict:
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


def _people(ctx: RunContext, tables: Tables, plan: Plan, scored: Scored) -> dict:
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


def write_results(out_dir: Path, out: dict) -> None:
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
