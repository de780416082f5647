"""After a vertical federation: what its scores are compared with, into metrics.json.

The authority's own measurements (authority.json) meet the baselines (the central model, its
DP twin, each silo alone, an analyst's references), the oracle (generated data only) and the
two empirical audits of epsilon; `outcome.py` lays out metrics.json. Each phase is saved in
phases.json as it finishes, so a killed run resumes at the first unfinished one. The
horizontal topology's counterpart is `horizontal.finish_horizontal`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd

from clients.protocol.schema import federation_silos
from crypto.secret_random import SecretRandom
from server import ledger_lines, run_phases
from server.gbdt_dp import DpTreeParams
from server.ledger import LEDGER_FILE
from server.privacy import model_epsilon
from server.run_keys import authority_random
from server.scores_file import read_scores
from simulations.analysis.audit import membership_audit, per_example_loss
from simulations.analysis.baselines import (
    BaselineJob,
    BaselineResult,
    JoinedData,
    join_parties,
    run_baselines,
)
from simulations.analysis.canary_audit import canary_audit
from simulations.analysis.curves import build_curves
from simulations.analysis.references import REFERENCES, joined_references
from simulations.analysis.tree_audit import TreeMechanism, from_ledger, tree_audit
from simulations.run.outcome import (
    Comparison,
    Outcome,
    membership_summary,
    merge_seconds,
    write_metrics,
)
from simulations.run.rundir import Run, oracle_auc

PRIVACY_KEYS = ("epsilon", "delta", "accountant", "noise_multiplier", "joint_noise_multiplier",
                "blocks", "statistics_noise_multiplier", "calibration_noise_multiplier",
                "sample_rate", "max_grad_norm", "training_steps", "stopped_by_budget_cap")
# How `delta` splits: the accountant's and the silos' category thresholds reserved out of the
# configured delta (server/delta_budget.py DeltaSplit); absent from runs made before the split.
DELTA_KEYS = ("delta_accountant", "delta_thresholds")
# max_grad_norm is each party's clip; the joint bound (privacy.max_grad_norm, split over the
# blocks since the MLP defaults of issue 20) is absent from runs made before.
OPTIONAL_PRIVACY_KEYS = (*DELTA_KEYS, "joint_max_grad_norm")
# Runs whose model accounts for its own releases (server/gbdt_dp_run.py `accounts_itself`):
# their canary audit is simulations/analysis/tree_audit.py's.
MODEL_KINDS = ("gbdt", "scorecard")



def finish_run(run: Run, federation_seconds: float) -> dict:
    """Baselines, the oracle, the audit and curves; writes metrics.json, curves.json and
    manifest.json. `run.authority` holds what the authority measured."""
    merge_seconds(run, federation_seconds)
    scores = read_scores(run.out_dir, run.keystore_dir, with_split=True)
    ref_hash = run.authority["subject_ref"].removeprefix("hmac-")
    joined = run.timer("join", join_parties, run.parties, scores, ref_hash, run.keystore)
    done = _baselines(run, joined, _baseline_jobs(run))
    test = joined.positions("test")
    # Real data has no truth table, hence no oracle.
    oracle = (run.timer("oracle", oracle_auc, run.parties, joined.ids[test], joined.y[test],
                        run.keystore) if run.cfg.generated else None)
    audit = _saved_audit(run, joined, scores)
    curves = build_curves(scores, joined.y)
    if run.authority.get("contributions"):
        curves["contributions"] = run.authority["contributions"]
    return write_metrics(run, _outcome(run, done, oracle, audit), curves)


def _baseline_jobs(run: Run) -> list[BaselineJob]:
    """The central model (and under DP its DP twin), and each silo alone under the run's own
    privacy; every DP baseline at the run's COMBINED epsilon: the joint noise multiplier."""
    authority, root = run.authority, run.parties.root
    sigma = authority.get("joint_noise_multiplier", authority["noise_multiplier"])
    silos = federation_silos(root)
    # The experiment's own secret (beside the parties' ones) keys the baselines' DP noise: the
    # same keystore reproduces them, nobody else can.
    secret = SecretRandom.load_or_create(run.keystore_dir or root, "simulation")
    # The baselines replay the authority's own batch plans (the simulation holds its keystore),
    # so without DP and staleness the central model is the federated one, step for step.
    run_key = authority["model"]["run_key"]
    plans = authority_random(run.keystore, root).key
    plan_keys = tuple(plans("plan", run_key, e) for e in range(run.cfg.authority.train.epochs))

    def job(name: str, members: tuple[str, ...], noise: float = 0.0) -> BaselineJob:
        return BaselineJob(name, members, noise, secret.key("baseline", run_key, name),
                           plan_keys)

    jobs = [job("central", silos)]
    if sigma > 0:
        jobs.append(job("central_dp", silos, sigma))
    return jobs + [job(silo, (silo,), sigma) for silo in silos]


def _saved_audit(run: Run, joined: JoinedData, scores: pd.DataFrame) -> dict:
    """The audit, or the one a killed run finished already (phases.json)."""
    kept = run_phases.saved(run.out_dir, "audit")
    if isinstance(kept, dict):
        return kept
    run_phases.maybe_fail("audit")
    # A DP tree or scorecard run's canary audit replays the releases its ledger records.
    ledger = run.out_dir / LEDGER_FILE
    lines = (ledger_lines.read(ledger) if run.authority.get("model_kind") in MODEL_KINDS
             and ledger.exists() else [])
    audit = run.timer("audit", _audit, joined, scores, run.authority, lines)
    run_phases.finish(run.out_dir, "audit", audit)
    return audit


def _outcome(run: Run, done: dict[str, BaselineResult], oracle: float | None,
             audit: dict) -> Outcome:
    """metrics.json's content: the authority's own measurements against the baselines."""
    authority = run.authority
    silos = federation_silos(run.parties.root)
    central, central_dp = done["central"], done.get("central_dp")
    # Absent from the baselines a run killed before this version saved (phases.json).
    refs = {name: done[name].metrics for name in REFERENCES if name in done}
    alone = {silo: done[silo] for silo in silos}
    # The best silo alone is chosen on validation AUC, and reported on test.
    best = max(alone, key=lambda s: alone[s].history[-1]["val_auc"])
    comparison = Comparison(
        oracle=oracle, central=central.metrics["auc"],
        central_dp=central_dp.metrics["auc"] if central_dp else None,
        best=best, best_auc=alone[best].metrics["auc"],
        references={name: refs[name]["auc"] if name in refs else None for name in REFERENCES})
    return Outcome(
        figures=authority["scored_test"] or {}, all_test_figures=authority["all_test"],
        comparison=comparison, tiers=authority["tiers"],
        default_rate_by_tier=authority["test_default_rate_by_tier"],
        people=authority["people"], round_trips=authority["round_trips"],
        aggregation_mode=authority["aggregation_mode"],
        privacy={**{k: authority[k] for k in PRIVACY_KEYS},
                 **{k: authority[k] for k in OPTIONAL_PRIVACY_KEYS if k in authority}},
        audit=audit,
        history={"federated": authority["history"], "central": central.history,
                 "central_dp": central_dp.history if central_dp else None},
        baselines={"central": central.metrics,
                   "central_dp": central_dp.metrics if central_dp else None,
                   **refs,
                   **{f"{s}_only": alone[s].metrics for s in silos}},
        own={
            "baseline_payments_only_auc": (alone["payments"].metrics["auc"]
                                           if "payments" in alone else None),
            # Each baseline's own training time; they may have run side by side.
            "baseline_seconds": {name: round(r.seconds, 3) for name, r in done.items()},
            # Why the configuration may not learn, any model (server/run_plan.py
            # `run_guardrails`; the MLP's only before stop 35, none before issue 20).
            "guardrails": authority.get("guardrails", []),
            # MLP runs: the epoch scored, and why (best validation loss without DP, last with
            # DP; server/training.py); absent before issue 20 item 5 and from tree runs.
            **({"kept": authority["kept"]} if "kept" in authority else {}),
            # model.kind=gbdt or scorecard: the model's settings, its protection, and that
            # eps_model is infinite (server/gbdt_run.py, server/scorecard_run.py `annotate`);
            # absent from MLP runs.
            **{k: authority[k] for k in ("model_kind", "gbdt", "scorecard", "authority_sees")
               if ("gbdt" in authority or "scorecard" in authority) and k in authority},
        })


def _baselines(run: Run, joined: JoinedData, jobs: list[BaselineJob]
               ) -> dict[str, BaselineResult]:
    """The baselines, or those a killed run finished already (phases.json): a resumed run goes
    on from the first unfinished phase instead of training them again."""
    kept = run_phases.saved(run.out_dir, "baselines")
    if isinstance(kept, dict):
        return {name: BaselineResult(**r) for name, r in kept.items()}
    run_phases.maybe_fail("baselines")
    done = run.timer("baselines", run_baselines, joined, jobs, run.cfg.authority)
    # A credit analyst's references beside the central MLP; saved and resumed with it.
    done.update(run.timer("references", joined_references, joined, run.cfg.authority.seed))
    run_phases.finish(run.out_dir, "baselines", {n: asdict(r) for n, r in done.items()})
    return done


def _audit(joined: JoinedData, scores: pd.DataFrame, authority: dict,
           lines: Sequence[ledger_lines.LedgerLine] = ()) -> dict:
    """Two empirical lower bounds on epsilon; each must stay below the accounted epsilon.

    At the top, as in every run directory: the loss-threshold membership attack on the
    released scores, training people against held-out test people with the clean labels, a
    sanity check that cannot tell DP from no DP. `canary`: a one-run audit with white-box
    canaries, a proof at 95 %, of the mechanism the run released: the DP trees' (or the DP
    scorecard's) own releases as the run's ledger records them (`lines`;
    simulations/analysis/tree_audit.py), else the run's joint DP-SGD (its noise, blocks,
    sample rate, steps and clip; simulations/analysis/canary_audit.py). Its coins are the
    auditor's, fresh each run."""
    p = scores["probability"].to_numpy(dtype=np.float64)
    loss = per_example_loss(joined.y, np.nan_to_num(p, nan=0.5))
    scored = scores["score"].notna().to_numpy()  # ineligible people have no released score

    def released(split: str) -> np.ndarray:
        rows = joined.positions(split)
        return loss[rows[scored[rows]]]

    accounted = model_epsilon(authority)
    result = membership_audit(released("train"), released("test"), authority["delta"])
    canary = _canary(joined, authority, lines)
    return {**membership_summary(result, accounted),
            "canary": {**canary, "accounted_epsilon": accounted}}


def _canary(joined: JoinedData, authority: dict,
            lines: Sequence[ledger_lines.LedgerLine]) -> dict:
    """The canary audit of what the run released (see `_audit`)."""
    rng = np.random.default_rng()  # the auditor's coins: OS entropy, fresh each run
    mechanism = model_mechanism(joined, authority, lines)
    if mechanism is not None:
        return tree_audit(mechanism, delta=float(authority["delta"]), rng=rng)
    return canary_audit(
        noise_multiplier=float(authority["noise_multiplier"]),
        blocks=int(authority.get("blocks") or len(joined.xs) + 1),
        sample_rate=float(authority["sample_rate"]), steps=int(authority["steps"]),
        max_grad_norm=float(authority["max_grad_norm"]), delta=float(authority["delta"]),
        rng=rng,
    )


def model_mechanism(joined: JoinedData, authority: dict,
                    lines: Sequence[ledger_lines.LedgerLine]) -> TreeMechanism | None:
    """What a DP tree or DP scorecard run released, from its ledger lines and its settings
    (authority.json's `gbdt`); None for any other run (and for a tree run without DP: the
    SecureBoost trees write no such line)."""
    if authority.get("model_kind") not in MODEL_KINDS:
        return None
    # A scorecard run has no `gbdt` (and no leaves or histograms: the defaults go unused).
    trees, default = authority.get("gbdt") or {}, DpTreeParams()
    return from_ledger(lines, depth=int(trees.get("depth") or default.depth),
                       hessian_noise=float(trees.get("hessian_noise") or default.hessian_noise),
                       guide_stat=str(trees.get("guide_stat") or default.guide_stat),
                       columns=sum(x.shape[1] for x in joined.xs.values()),
                       accountant=str(authority.get("accountant") or "prv"))
