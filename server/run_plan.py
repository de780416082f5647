"""What an authority run fixes before training: PSI alignment, the shared order and split,
the labels gradients may see (randomised response once) and the private prior, then the
privacy plan, the silos' model spec and the reason codes asked, announced to the silos.

Every draw here comes from the authority's secret streams for this run, never from the public
seed; their order is the run's, which a rerun from the same keystore repeats bit for bit.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from clients.protocol.dp_constants import PRIOR_NOISE_MULTIPLIER
from clients.protocol.model import ModelSpec
from clients.protocol.reasons import MAX_REASONS
from clients.protocol.run_mode import RunMode
from crypto.identity import PHONE, IdentifierFormat
from crypto.secret_random import SecretRandom
from server import checkpoint, gbdt_dp_run, run_phases
from server.alignment import Alignment, announce, joint_order, private_intersections
from server.checkpoint import RunState, TrainState
from server.config import AuthorityConfig
from server.dp_guardrails import Guardrail
from server.federation import Federation
from server.guardrails import People, before_training, needs_rate
from server.label_dp import randomized_response
from server.privacy import PrivacyPlan
from server.run_context import Plan, RunContext, Tables
from server.run_keys import derive_people_key, derive_run_key
from server.split import Split, random_split

log = logging.getLogger(__name__)


def align_and_split(
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



def plan_training(ctx: RunContext, tables: Tables, run: RunState, state: TrainState | None
                   ) -> Plan:
    """Labels, privacy plan and model; then, on a fresh run, the run's checkpoint, the silos'
    announcement and the ledger's first lines, or, resumed, the accountants as they were."""
    cfg = ctx.cfg
    split = Split(run.train, run.val, run.test)
    privacy = PrivacyPlan(gbdt_dp_run.sgd_config(cfg).privacy, ctx.fed.silos, len(split.train),
                          cfg.train.batch_size, cfg.train.epochs, ctx.ledger, summaries_asked(cfg))
    guardrails = run_guardrails(cfg, privacy, tables.labels[run.authority_rows][split.train])
    for guardrail in guardrails:  # also in authority.json and metrics.json
        log.warning("privacy guardrail (%s, %s): %s", guardrail.check, guardrail.level,
                    guardrail.message)
    spec = model_spec(cfg, privacy, len(ctx.fed.silos))
    if cfg.aggregation.mode == "concat":
        log.warning("aggregation.mode=concat: the authority sees every silo's embeddings; "
                    "secure aggregation does not apply (docs/threat-model.md)")
    if state is None:
        checkpoint.save_run(ctx.out_dir, run, ctx.store)
        run_phases.finish(ctx.out_dir, "align")
        # The run's kind and target epsilon ride on the announcement: each silo pins them
        # and judges the run's later requests by them (clients/protocol/run_mode.py).
        inputs = announce(ctx.fed, Alignment(run.authority_rows, run.silo_rows, {}),
                          {**spec.to_config(), "run": run.run_key,
                           "secure": cfg.aggregation.secure_sum,
                           **RunMode(cfg.model.kind, cfg.privacy.epsilon).to_config()})
        privacy.record_start()
    else:
        inputs = {s: int(tables.info[s]["inputs"]) for s in ctx.fed.silos}
        privacy.restore(state.privacy_spent, state.privacy_round_steps,
                        state.transcript_releases, state.transcript_sampled)
    y = tables.labels[run.authority_rows].astype(np.int8)
    return Plan(run, state, split, y, privacy, spec, inputs, reasons_asked(cfg),
                tuple(guardrails))


def run_guardrails(cfg: AuthorityConfig, privacy: PrivacyPlan, y_train: np.ndarray
                   ) -> list[Guardrail]:
    """Why this run may not learn, for every model kind, on its exact training people: the
    MLP's from its privacy plan (the sampling and the noise it calibrated), the trees' and
    the scorecard's from server/guardrails.py `before_training`, which judges the trees on
    randomised labels by the training default rate. The run logs and records `message` only
    (no statistic of the labels: `Guardrail.detail` stays out)."""
    if cfg.model.kind == "mlp":
        return privacy.guardrails()
    rate = float(y_train.mean()) if needs_rate(cfg) and len(y_train) else None
    return before_training(cfg, People(n_train=len(y_train), positive_rate=rate))


def model_spec(cfg: AuthorityConfig, privacy: PrivacyPlan, silos: int) -> ModelSpec:
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


def reasons_asked(cfg: AuthorityConfig) -> int:
    """Reason codes to ask the silos for: none outside plain `sum` mode (config comment)."""
    if cfg.model.kind == "scorecard":  # its partial logits show the authority as much
        return cfg.explain.reasons or MAX_REASONS
    if cfg.model.kind == "gbdt":  # the splits and paths show the authority as much
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
