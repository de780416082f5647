"""One experiment: generate parties, run the federation, compare with baselines and the truth.

The run directory receives config.json (resolved), manifest.json (versions, commit, seed,
timings), metrics.json, authority.json (what the authority itself measured) and scores.parquet.
Party tables live elsewhere (see simulations.data.paths); nothing here holds a phone number.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.schema import AUTHORITY, federation_silos
from clients.silo.app import make_client_app
from clients.silo.data import load_silo
from clients.silo.enrolment import enrol, policy_for
from crypto.at_rest import Keystore
from crypto.secret_random import SecretRandom
from crypto.tls import Credentials
from server import run_phases
from server.authority import RunResult
from server.config import ConfigError
from server.config_keys import to_flat
from server.labels import load_labels
from server.privacy import model_epsilon
from server.run_keys import authority_random
from server.run_lock import claim, held_token
from server.scores_file import read_scores
from server.server_app import make_cells_app, make_server_app
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
from simulations.data.paths import Parties, RunDirError, resume_command
from simulations.data.population import PopulationConfig, generate, write_parties
from simulations.data.real_data import import_parties, resolve_mapping
from simulations.run.config import (
    ExperimentConfig,
    check_delta,
    check_delta_reservation,
    check_guardrails,
)
from simulations.run.deploy import deployment, progress_relay
from simulations.run.engine import run_federation
from simulations.run.horizontal import run_horizontal
from simulations.run.outcome import (
    Comparison,
    Outcome,
    membership_summary,
    merge_seconds,
    write_metrics,
)
from simulations.run.rundir import (
    Interrupted,
    Progress,
    Run,
    claim_run_dir,
    open_run,
    oracle_auc,
    resumable,
    unclaim_run_dir,
)

log = logging.getLogger(__name__)

PRIVACY_KEYS = ("epsilon", "delta", "accountant", "noise_multiplier", "joint_noise_multiplier",
                "blocks", "statistics_noise_multiplier", "calibration_noise_multiplier",
                "sample_rate", "max_grad_norm", "training_steps", "stopped_by_budget_cap")
# How `delta` splits: the accountant's and the silos' category thresholds reserved out of the
# configured delta (server/delta_budget.py DeltaSplit); absent from runs made before the split.
DELTA_KEYS = ("delta_accountant", "delta_thresholds")
# max_grad_norm is each party's clip; the joint bound (privacy.max_grad_norm, split over the
# blocks since the MLP defaults of issue 20) is absent from runs made before.
OPTIONAL_PRIVACY_KEYS = (*DELTA_KEYS, "joint_max_grad_norm")


def prepare_parties(pop: PopulationConfig, parties: Parties, store: Keystore | None = None
                    ) -> bool:
    """Generate and write the party tables unless the same population is already there;
    encrypted with `store` when given.

    Returns True when existing tables were reused.
    """
    if parties.population_json.exists():
        # Compared as configs, so a file from before a field existed matches its default.
        if PopulationConfig.from_json(parties.population_json.read_text()) == pop:
            return True
        raise RunDirError(
            f"{parties.root} holds party tables of another population; choose another "
            "--parties directory or delete that one"
        )
    write_parties(generate(pop), parties.root, store=store)
    return False


def check_parties(parties: Parties, store: Keystore | None = None) -> dict[str, int]:
    """Validate every party's table before the engine starts; returns row counts."""
    ids, _ = load_labels(parties.party(AUTHORITY), store)
    rows = {AUTHORITY: len(ids)}
    for silo in federation_silos(parties.root):
        rows[silo] = len(load_silo(parties.party(silo), silo, store).x)
    return rows


def ready_parties(run: Run) -> None:
    """Generate (or reuse) and validate the party tables before the engine starts."""
    store = run.keystore
    if run.cfg.generated:
        run.reused = run.timer("generate", prepare_parties, run.cfg.population, run.parties,
                               store)
    else:
        mapping = resolve_mapping(run.cfg.data)
        run.reused = run.timer("import", import_parties, mapping, run.parties.root, store)
    rows = run.timer("validate", check_parties, run.parties, store)
    # delta against the people the authority declares: refused here, not after engine and PSI.
    check_delta(run.cfg, rows[AUTHORITY], "the authority's table")
    check_delta_reservation(run.cfg, tuple(federation_silos(run.parties.root)))
    # A DP configuration that cannot learn, refused before the engine on an upper bound of the
    # people in training (every party's rows bound who can be aligned).
    check_guardrails(run.cfg, min(rows.values()), "the smallest party's table")
    # The simulation plays every silo's operator: identity keys, the roster, and a policy
    # allowing what this experiment asks (clients/silo/enrolment.py).
    asked = run.cfg.authority
    enrol(run.parties.root, federation_silos(run.parties.root), run.keystore_dir,
          policy_for(explain=asked.explain.reasons, secure_sum=asked.aggregation.secure_sum,
                     concat=asked.aggregation.mode == "concat", kind=asked.model.kind,
                     min_child_weight=asked.gbdt.min_child_weight
                     if asked.model.kind == "gbdt" and not asked.privacy.dp_sgd else None))


def client_app_for(run: Run):
    return make_client_app(run.parties.root, run.keystore_dir,
                           plaintext=run.keystore_dir is None)


ENGINES = ("simulation", "deployment")


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: Path,
    parties_dir: Path,
    progress: Progress | None = None,
    resume: bool = False,
    engine: str = "simulation",
    credentials: Path | None = None,
) -> dict:
    """One run on Flower's simulation engine (in-process), or on the deployment engine
    (a SuperLink and one SuperNode per silo on loopback, with TLS and node authentication)."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if not resume:
        claim_run_dir(out_dir)  # before the lock creates the directory: nothing changed
    try:
        # One writer per run directory for the whole command (server/run_lock.py): a second
        # `--resume` is refused instead of replaying rounds into the same ledger.
        with claim(out_dir, "fedscore run --resume" if resume else "fedscore run"):
            if resume and (out_dir / "metrics.json").exists():  # finished while we waited
                raise RunDirError(f"{out_dir} already finished (metrics.json exists); nothing "
                                  "to resume")
            if resume and not resumable(out_dir):
                # Stopped before its first round ended (Ctrl-C while the engine started, say):
                # nothing to continue, so it starts again in its own directory, as the same
                # run (its config.json, parties and keystore).
                log.warning("%s never finished a round: starting it again", out_dir.name)
                resume = False
            if cfg.authority.topology == "horizontal":
                return _run_horizontal(cfg, out_dir, parties_dir, progress, resume, engine)
            return _run_vertical(cfg, out_dir, parties_dir, progress, resume, engine,
                                 credentials)
    except KeyboardInterrupt as exc:
        raise Interrupted(resume_command(out_dir)) from exc


def _run_vertical(cfg: ExperimentConfig, out_dir: Path, parties_dir: Path,
                  progress: Progress | None, resume: bool, engine: str,
                  credentials: Path | None) -> dict:
    run = open_run(cfg, out_dir, parties_dir, resume, progress,
                   {"engine": engine, "credentials": str(credentials) if credentials else None})
    try:
        ready_parties(run)
        if engine == "deployment" and credentials is not None:
            # Given credentials are an input too: a leaky ca.key is refused before anything
            # starts (the default ones are made on first use, inside the deployment).
            Credentials(credentials).check(federation_silos(run.parties.root))
    except BaseException:
        if not resume:  # a refused input must not leave a --out that refuses the retry
            unclaim_run_dir(out_dir)
        raise
    t = time.perf_counter()
    if resume and run_phases.federated_done(out_dir):
        # Killed after the federated part (baselines, audit, report): its results are all in
        # authority.json and the scores; continue at the first unfinished phase.
        run.authority.update(json.loads((out_dir / "authority.json").read_text()))
        log.info("resuming %s at phase %s", out_dir.name, run_phases.first_unfinished(out_dir))
        return finish_run(run, sum(run.authority["seconds"].values()))
    if engine == "deployment":
        run_deployed(run, progress, credentials)
    else:
        import_optimizers()
        run_federation(
            make_server_app(cfg.authority, run.parties.root, out_dir, progress,
                            on_result=lambda r: run.authority.update(r.metrics), resume=resume),
            client_app_for(run),
            silos=len(federation_silos(run.parties.root)),
        )
    return finish_run(run, time.perf_counter() - t)


def _run_horizontal(cfg: ExperimentConfig, out_dir: Path, parties_dir: Path,
                    progress: Progress | None, resume: bool, engine: str) -> dict:
    if engine != "simulation":
        raise ConfigError("topology=horizontal runs on the simulation engine (fedscore run); "
                          "the deployment engine serves the vertical topology")
    if resume:
        raise ConfigError("a horizontal run cannot be resumed: its rounds are short; start it "
                          "again with a new --out")
    if not cfg.generated:
        raise ConfigError("topology=horizontal needs a generated population; real data (--data) "
                          "comes as vertical silos")
    run = open_run(cfg, out_dir, parties_dir, resume, progress, {"engine": engine})
    return run_horizontal(run, progress)


def import_optimizers() -> None:
    """torch imports its compiler (torch._dynamo) when it builds its first optimizer: seconds
    that the authority would spend as training starts, in the ServerApp's thread, which Ctrl-C
    stops only at its next message (engine.run_federation). Imported here, before the engine."""
    import torch._dynamo  # noqa: F401


def run_deployed(run: Run, progress: Progress | None, credentials: Path | None) -> None:
    """The federated part under the deployment engine; the authority writes authority.json
    into the run directory, which is all `finish_run` needs from it."""
    root = run.parties.root
    # The ServerApp runs in another process and claims the run directory too: the token of
    # our lock lets it act for us instead of being refused (server/run_lock.py).
    lock_token = held_token(run.out_dir)
    run_config = {**to_flat(run.cfg.authority), "data-dir": str(root),
                  "run-dir": str(run.out_dir), "resume": run.resume,
                  "run-lock": lock_token}
    if progress:
        progress("connect", 0, None)
    with deployment(tuple(federation_silos(root)), root, run.keystore_dir,
                    run.out_dir / "deploy", state=root.with_name(root.name + ".deploy"),
                    credentials=credentials) as dep:
        dep.submit(run_config, run.out_dir, progress_relay(progress))
    run.authority.update(json.loads((run.out_dir / "authority.json").read_text()))


def run_cells(cells: list[tuple[ExperimentConfig, Path, bool]], parties_dir: Path,
              progress: Progress | None = None,
              on_done: Callable[[int, str], None] | None = None) -> list[str]:
    """Several runs on the same parties in ONE federation (a sweep's cells of one seed): the
    engine starts once and PSI runs once. Returns an error message per cell ("" = finished)."""
    if cells[0][0].authority.topology == "horizontal":
        return _horizontal_cells(cells, parties_dir, progress, on_done)
    with ExitStack() as held:
        # Every cell's directory is this sweep's until its cells are done.
        for _, out, resume in cells:
            if not resume:
                claim_run_dir(out)
            held.enter_context(claim(out, "fedscore sweep"))
        return _run_cells(cells, parties_dir, progress, on_done)


def _run_cells(cells: list[tuple[ExperimentConfig, Path, bool]], parties_dir: Path,
               progress: Progress | None,
               on_done: Callable[[int, str], None] | None) -> list[str]:
    runs = [open_run(cfg, out, parties_dir, resume, progress) for cfg, out, resume in cells]
    ready_parties(runs[0])
    for other in runs[1:]:
        other.reused, other.timer.seconds = True, dict(runs[0].timer.seconds)
    errors = [""] * len(runs)

    def finished(i: int, result: RunResult | None, error: str, seconds: float) -> None:
        # The cell's clock: its federated part, then its own finishing.
        runs[i].t0 = time.perf_counter() - seconds
        if result is not None:
            runs[i].authority.update(result.metrics)
            try:
                finish_run(runs[i], seconds)
            except Exception as exc:  # one cell's baseline failing must not stop the others
                log.exception("cell %s: finishing failed", runs[i].out_dir.name)
                error = f"{type(exc).__name__}: {exc}"
        errors[i] = error
        if on_done:
            on_done(i, error)

    # Cells killed after their federated part (phases.json) only have their later phases
    # left: they skip the federation. The federation's thread only records the others'
    # outcomes: their baselines and audit run here, after it, so the ServerApp thread is never
    # busy for long away from the grid, where an interrupt stops it (engine.run_federation).
    outcomes: list[tuple[int, RunResult | None, str, float]] = []
    pending = []
    for i, r in enumerate(runs):
        if r.resume and run_phases.federated_done(r.out_dir):
            authority = json.loads((r.out_dir / "authority.json").read_text())
            outcomes.append((i, RunResult(authority), "", sum(authority["seconds"].values())))
        else:
            pending.append(i)

    def federated(j: int, result: RunResult | None, error: str, seconds: float) -> None:
        outcomes.append((pending[j], result, error, seconds))

    if pending:
        import_optimizers()
        run_federation(
            make_cells_app([(runs[i].cfg.authority, runs[i].out_dir, runs[i].resume)
                            for i in pending], runs[0].parties.root, progress, federated),
            client_app_for(runs[0]),
            silos=len(federation_silos(runs[0].parties.root)),
        )
    for outcome in outcomes:
        finished(*outcome)
    return errors


def _horizontal_cells(cells: list[tuple[ExperimentConfig, Path, bool]], parties_dir: Path,
                      progress: Progress | None,
                      on_done: Callable[[int, str], None] | None) -> list[str]:
    """A horizontal sweep's cells, one federation each (a round costs little to restart)."""
    errors = []
    for i, (cfg, out, _) in enumerate(cells):
        error = ""
        try:
            run_experiment(cfg, out, parties_dir, progress)
        except Exception as exc:  # one cell failing must not stop the others
            log.exception("cell %s failed", out.name)
            error = f"{type(exc).__name__}: {exc}"
        errors.append(error)
        if on_done:
            on_done(i, error)
    return errors


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
    audit = run.timer("audit", _audit, joined, scores, run.authority)
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
            # Why the DP configuration may not learn (server/privacy.py); absent before
            # issue 20.
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


def _audit(joined: JoinedData, scores: pd.DataFrame, authority: dict) -> dict:
    """Two empirical lower bounds on epsilon; each must stay below the accounted epsilon.

    At the top, as in every run directory: the loss-threshold membership attack on the
    released scores, training people against held-out test people with the clean labels, a
    sanity check that cannot tell DP from no DP. `canary`: the one-run audit of the run's
    joint DP-SGD (its noise, blocks, sample rate, steps and clip) with white-box gradient
    canaries, a proof at 95 % (simulations/analysis/canary_audit.py). Its coins are the
    auditor's, fresh each run."""
    p = scores["probability"].to_numpy(dtype=np.float64)
    loss = per_example_loss(joined.y, np.nan_to_num(p, nan=0.5))
    scored = scores["score"].notna().to_numpy()  # ineligible people have no released score

    def released(split: str) -> np.ndarray:
        rows = joined.positions(split)
        return loss[rows[scored[rows]]]

    accounted = model_epsilon(authority)
    result = membership_audit(released("train"), released("test"), authority["delta"])
    canary = canary_audit(
        noise_multiplier=float(authority["noise_multiplier"]),
        blocks=int(authority.get("blocks") or len(joined.xs) + 1),
        sample_rate=float(authority["sample_rate"]), steps=int(authority["steps"]),
        max_grad_norm=float(authority["max_grad_norm"]), delta=float(authority["delta"]),
        rng=np.random.default_rng(),
    )
    return {**membership_summary(result, accounted),
            "canary": {**canary, "accounted_epsilon": accounted}}
